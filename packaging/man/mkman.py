#!/usr/bin/python3
"""Write the man pages dtsd(8), dtsctl(1) and dtsd.ini(5) from dtsd's own code.

    PYTHONPATH=. python3 packaging/man/mkman.py OUTDIR

The options, verbs and their help come from the click commands (what `--help` prints),
the signals from the master's docstring, the seed's variables from the configuration
loader, and every dtsd.ini option, default and help from `dtsd.config.OPTIONS` (what
`dtsd config-reference` prints). So a page cannot drift from the code; only the prose
below (what the daemon is, the files, systemd) is written here by hand.
The package build runs this (debian/rules); the date is SOURCE_DATE_EPOCH's when set.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
import time

import click

from dtsd import __version__, child, config, daemon, master
from dtsd import cli as dtsctl

SOURCE = f"dtsd {__version__}"
MANUAL = "dtsd manual"


# --- roff ----------------------------------------------------------------------------------

def esc(text: str) -> str:
    """Text for roff: backslashes and leading control characters escaped, `code` in bold."""
    text = text.replace("\\", "\\e")
    text = re.sub(r"`([^`]+)`", lambda m: "\\fB" + m.group(1).replace("-", "\\-") + "\\fR", text)
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in text.split("\n"))


def opt(text: str) -> str:
    """An option or command name: every hyphen a minus sign."""
    return esc(text).replace("-", "\\-")


def paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n\s*\n", inspect.cleandoc(text)) if p.strip()]


def block(paragraph: str) -> list[str]:
    """A filled paragraph, or a no-fill one when it is laid out by hand (click's \\b
    marker, or indented lines)."""
    lines = paragraph.split("\n")
    if lines[0].strip() == "\b":
        lines = lines[1:]
    elif not any(line.startswith(" ") for line in lines[1:]):
        return [".PP", esc(" ".join(line.strip() for line in lines))]
    return [".PP", ".nf", *(esc(line) for line in lines), ".fi"]


def help_paragraphs(text: str | None) -> list[str]:
    out: list[str] = []
    for paragraph in paragraphs((text or "").split("\f")[0]):
        out += block(paragraph)
    return out


def header(name: str, section: int) -> list[str]:
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))
    date = time.strftime("%Y-%m-%d", time.gmtime(epoch))
    return [f'.TH {name.upper()} {section} {date} "{SOURCE}" "{MANUAL}"']


def options(command: click.Command, ctx: click.Context) -> list[str]:
    out = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, text = record
        out += [".TP", "\\fB" + opt(names) + "\\fR", esc(text)]
    return out


def usage(command: click.Command, ctx: click.Context) -> str:
    return " ".join(command.collect_usage_pieces(ctx))


def verbs(group: click.Group, ctx: click.Context, path: str) -> list[str]:
    """Each command of `group` (and of its subgroups): usage, help, options."""
    out = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        sub = click.Context(command, info_name=name, parent=ctx, **command.context_settings)
        if isinstance(command, click.Group):
            out += verbs(command, sub, f"{path} {name}")
            continue
        out += [".SS " + opt(f"{path} {name}") + " " + esc(usage(command, sub))]
        out += help_paragraphs(command.help)
        out += options(command, sub)
    return out


def write(outdir: str, filename: str, lines: list[str]) -> None:
    path = os.path.join(outdir, filename)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"mkman: wrote {path}")


# --- what the code says -------------------------------------------------------------------

def seed_variables() -> list[tuple[str, str]]:
    """(variable, "[section] key") for each seed variable the loader applies."""
    source = inspect.getsource(config._apply_env)
    found = re.findall(r'env\.get\("(\w+)"\):\s*\n(?:\s*\w+ = .*\n)*?\s*raw\["(\w+)"\]\["(\w+)"\]',
                       source)
    if not found:
        sys.exit("mkman: found no environment variables in config._apply_env")
    return [(name, f"[{section}] {key}") for name, section, key in found]


def signal_table() -> list[tuple[str, str]]:
    """The master docstring's table: `    TERM, INT   graceful stop ...`, a row's text
    going on in the lines indented to it."""
    rows = [(names, " ".join(text.split())) for names, text in re.findall(
        r"^    ([A-Z0-9]+(?:, [A-Z0-9]+)*) {2,}(.+(?:\n {8,}\S.*)*)$", master.__doc__ or "", re.M)]
    if not rows:
        sys.exit("mkman: found no signal table in dtsd.master's docstring")
    return rows


def daemon_synopsis() -> list[str]:
    """The usage lines of dtsd.daemon's docstring: `    dtsd ...   what it does`."""
    rows = re.findall(r"^    (dtsd\b.*?)(?: {2,}.*)?$", daemon.__doc__ or "", re.M)
    if not rows:
        sys.exit("mkman: found no usage lines in dtsd.daemon's docstring")
    return rows


def default(section: str, key: str) -> str:
    return next(o.default for o in config.OPTIONS if (o.section, o.key) == (section, key))


# --- the pages ----------------------------------------------------------------------------

def dtsd_page() -> list[str]:
    group = daemon.main
    ctx = click.Context(group, info_name="dtsd", **group.context_settings)
    runtime_dir = default("dtsd", "runtime_dir")
    worker_wait, kill_grace = default("worker", "stopwaitsecs"), default("worker", "kill_grace")
    out = header("dtsd", 8)
    out += [".SH NAME", "dtsd \\- distributed task scheduler daemon", ".SH SYNOPSIS", ".nf"]
    out += [esc(line).replace("-", "\\-").replace("dtsd", "\\fBdtsd\\fR", 1)
            for line in daemon_synopsis()]
    out += [".fi", ".SH DESCRIPTION"]
    out += help_paragraphs(group.help)
    out += [".PP", esc(
        "The master holds no database, Redis or gRPC connection. It runs `dtsd migrate` as a "
        "subprocess, then starts each child as a fresh interpreter: "
        "`[server] processes` gRPC API servers, all bound to `[server] listen`; "
        "`[worker] processes` workers, each running up to `[worker] concurrency` jobs; and one "
        "coordinator, which does the housekeeping and publishes this node's record for "
        "`dtsctl status`. Children that die are restarted with a back-off; a child that keeps "
        "failing to start is given up (FATAL) while the rest of the node serves on."),
        ".PP", esc(
        "Jobs are shell commands (`[worker] shell -c COMMAND`). Each runs in its own session "
        "and process group, with a clean environment, standard input from /dev/null, a "
        "private TMPDIR, and not as the daemon's user: as a job slot user of its own, one "
        f"uid of `[worker] job_uids` ({default('worker', 'job_uids')}) per job running at "
        "once (dtsd-job-0, dtsd-job-1 ... from the package), with the groups of `[worker] "
        f"job_user` ({default('worker', 'job_user') or 'none'}), no capability in any set and "
        "no_new_privs, under `[worker] limits`. So a job can neither signal, trace nor read "
        "another job, nor read the configuration or the tokens, nor write to dtsd's directories.")]
    out += [".SH OPTIONS"] + options(group, ctx)
    out += [".SH COMMANDS"] + verbs(group, ctx, "dtsd")
    out += [".SH SIGNALS", "The master acts on these signals; handlers only wake its loop."]
    for names, text in signal_table():
        out += [".TP", "\\fB" + esc(names) + "\\fR", esc(text)]
    out += [".SH SYSTEMD", esc(
        "dtsd.service runs the master as user dtsd with `Type=notify`: `systemctl start dtsd` "
        "returns once every child runs (READY=1), `systemctl status dtsd` shows the master's "
        "STATUS= line (role, children running, jobs pending), `systemctl reload dtsd` runs "
        "`dtsd reload`, which sends HUP and waits for the master's verdict: it fails, with "
        "the reason in the journal, when the master refuses the file (every start check runs "
        "on it, and the running configuration stays), and returns once the new configuration "
        "runs (RELOADING=1, then READY=1). A refused configuration at start exits 78, which "
        "the unit does not restart (`RestartPreventExitStatus=78`). "
        "`systemctl stop dtsd` sends TERM to the master alone (`KillMode=mixed`), which drains "
        f"its children: running jobs get `[worker] stopwaitsecs` ({worker_wait}) to finish and "
        f"`[worker] kill_grace` ({kill_grace}) after that. The master pings the watchdog from "
        "its loop. Its log goes to the journal: `journalctl -u dtsd`."),
        ".PP", esc(
        "The unit is sandboxed, and jobs run inside the sandbox too, as their slot users: "
        "they may use the network and write to the /tmp and /var/tmp private to the service "
        "(each job gets a private TMPDIR there); /var/lib/dtsd (0750) and "
        f"{runtime_dir} belong to dtsd and are not theirs to write, the rest of the file "
        "system is read-only, /home, /root and /run/user are hidden, other users' processes "
        "are hidden in /proc, and no job can gain privileges. "
        "/usr/share/doc/dtsd/examples/relax-hardening.conf is a drop-in for "
        "/etc/systemd/system/dtsd.service.d/ that loosens the sandbox, line by line.")]
    out += [".SH EXIT STATUS", esc(
        "0 after a requested stop (and for --check-config on a valid file, 1 on an error). "
        f"{child.EXIT_CONFIG} (EX_CONFIG) when the master refuses the configuration: it does "
        "not parse, or a start check fails (exposure, secrets, unreadable files, the job "
        f"user), or a child exits {child.EXIT_CONFIG} before the node was first ready; also "
        "when the PostgreSQL database or role of `[postgres] dsn` does not exist (the log "
        "names the createuser and createdb commands that create them). "
        "1 when it stops on its own for another reason: the listen address in use, "
        "PostgreSQL unreachable or another failed migration, a child exiting "
        f"{child.EXIT_BOOT} (cannot start) before the node was first ready.")]
    out += [".SH ENVIRONMENT", ".TP", "\\fBDTSD_CONFIG\\fR",
            esc(f"The configuration file when -c is not given (default {config.DEFAULT_PATH})."),
            ".PP", "The seed's variables override the file when set and not empty:"]
    for name, where in seed_variables():
        out += [".TP", f"\\fB{name}\\fR", esc(where)]
    out += [".SH FILES",
            ".TP", esc(config.DEFAULT_PATH),
            "The configuration (a conffile, mode 0640 root:dtsd); see \\fBdtsd.ini\\fR(5).",
            ".TP", esc(runtime_dir),
            esc("Runtime directory: this node's record (node.json) and the workers' job "
                "registries."),
            ".TP", "/var/lib/dtsd",
            "State directory of the service, and the dtsd user's home.",
            ".TP", "/lib/systemd/system/dtsd.service", "The unit.",
            ".SH SEE ALSO",
            "\\fBdtsctl\\fR(1), \\fBdtsd.ini\\fR(5), \\fBsystemctl\\fR(1), "
            "\\fBsystemd.exec\\fR(5), \\fBjournalctl\\fR(1)"]
    return out


def dtsctl_page() -> list[str]:
    group = dtsctl.cli
    ctx = click.Context(group, info_name="dtsctl", **group.context_settings)
    summary = (group.help or "").split("\n")[0].removeprefix("dtsctl:").strip().rstrip(".")
    out = header("dtsctl", 1)
    out += [".SH NAME", "dtsctl \\- " + esc(summary), ".SH SYNOPSIS",
            "\\fBdtsctl\\fR [\\fIGLOBAL OPTIONS\\fR] \\fIVERB\\fR [\\fIOPTIONS\\fR] "
            "[\\fIARGS\\fR]",
            ".SH DESCRIPTION", esc(
                "dtsctl talks to the gRPC API of dtsd servers. Global options may come before "
                "or after the verb (after `submit` and `cron add`, `--timeout` is the job's "
                "timeout). `dtsctl VERB --help` prints a verb's help.")]
    # The module docstring: which servers, exit codes, the JSON fields. Its title, usage
    # line and list of verbs are what NAME, SYNOPSIS and COMMANDS show.
    sections = {"Which servers": "SERVERS", "Exit codes": "EXIT STATUS",
                "JSON output": "JSON OUTPUT"}
    body: dict[str, list[str]] = {"DESCRIPTION": []}
    current = "DESCRIPTION"
    for paragraph in paragraphs(dtsctl.__doc__ or ""):
        if paragraph.lstrip().startswith(("dtsctl:", "dtsctl [", "Verbs:")):
            continue
        current = next((title for prefix, title in sections.items()
                        if paragraph.startswith(prefix)), current)
        body.setdefault(current, []).extend(block(paragraph))
    out += body.pop("DESCRIPTION")
    out += [".SH GLOBAL OPTIONS"] + options(group, ctx)
    out += [".SH COMMANDS"] + verbs(group, ctx, "dtsctl")
    for title, lines in body.items():
        out += [f'.SH "{title}"'] + lines
    out += [".SH ENVIRONMENT"]
    for param in group.params:
        names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
        for name in names:
            out += [".TP", f"\\fB{name}\\fR", "As \\fB" + opt(param.opts[-1]) + "\\fR."]
    for name, text in (("DTSD_SERVERS", "As --servers."), ("SERVERS", "As --servers (the seed's name)."),
                       ("SUBMIT_SERVER", "As --submit-server."),
                       ("STATUS_SERVERS", "As --status-servers."),
                       ("DTSD_CONFIG", f"As -c (default {config.DEFAULT_PATH}, when readable)."),
                       ("DTSD_TOKEN", "As --token."), ("DTSD_TOKEN_FILE", "As --token-file."),
                       ("GRPC_VERBOSITY", "gRPC's own logging; dtsd sets NONE unless it is set.")):
        out += [".TP", f"\\fB{name}\\fR", opt(text)]
    # What dtsctl reads of the file, from the code that reads it (dtsd.cli.CLIENT_KEYS).
    read = ", ".join(f"[{section}] {key}" for section, key in dtsctl.CLIENT_KEYS)
    out += [".SH FILES", ".TP", esc(config.DEFAULT_PATH),
            esc(f"dtsctl reads {read} (see `dtsd.ini`(5)); an error elsewhere in the "
                "file is only warned about."),
            ".TP", esc("/usr/share/bash-completion/completions/dtsctl"),
            esc("Completion for bash; zsh and fish get theirs in "
                "/usr/share/zsh/vendor-completions/_dtsctl and "
                "/usr/share/fish/vendor_completions.d/dtsctl.fish."),
            ".SH SEE ALSO", "\\fBdtsd\\fR(8), \\fBdtsd.ini\\fR(5)"]
    return out


def ini_page() -> list[str]:
    out = header("dtsd.ini", 5)
    out += [".SH NAME", "dtsd.ini \\- configuration file of the dtsd task scheduler",
            ".SH SYNOPSIS", esc(config.DEFAULT_PATH), ".SH DESCRIPTION"]
    # The reference file's own header: format, units, how to check and apply a change.
    intro = []
    for line in config.reference_ini().split("\n")[2:]:
        if not line.startswith(";"):
            break
        intro.append(line.lstrip("; ").rstrip())
    out += [".PP", esc(" ".join(intro))]
    out += [".PP", esc(
        "The file is INI: `[section]` headers and `key = value` lines; comments start with "
        "`;` or `#`, also after a value. Every option is optional. dtsd reads the file at "
        "start and on HUP (`systemctl reload dtsd`); a file with an error, or one that fails "
        "a start check, is refused whole, with a message naming the file, the section and "
        "the key, and a running daemon keeps its configuration. The installed file lists every option, commented "
        "out, with its default: `dtsd config-reference` prints it.")]
    out += [".SH OPTIONS"]
    for section in config.SECTIONS:
        out += [f".SS [{section}]"]
        for option in config.OPTIONS:
            if option.section != section:
                continue
            value = option.default if option.default else "(empty)"
            out += [".TP", f"\\fB{opt(option.key)}\\fR = {esc(value)}", esc(option.help)]
    out += [".SH ENVIRONMENT", "These variables override the file when set and not empty:"]
    for name, where in seed_variables():
        out += [".TP", f"\\fB{name}\\fR", esc(where)]
    out += [".SH SEE ALSO", "\\fBdtsd\\fR(8), \\fBdtsctl\\fR(1)"]
    return out


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: mkman.py OUTDIR")
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    write(outdir, "dtsd.8", dtsd_page())
    write(outdir, "dtsctl.1", dtsctl_page())
    write(outdir, "dtsd.ini.5", ini_page())


if __name__ == "__main__":
    main()
