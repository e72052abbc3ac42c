"""`dtsd`: the daemon's command line.

    dtsd [-c FILE]                      run the master in the foreground
    dtsd --check-config [-c FILE]       validate the configuration and exit (0: fine)
    dtsd --daemon --pidfile FILE        detach (for hosts without systemd)
    dtsd reload [--pid PID] [-c FILE]   reload the running master and wait for its verdict
    dtsd migrate [-c FILE]              bring the PostgreSQL schema up to date
    dtsd config-reference               print the reference dtsd.ini (every option, default)
    dtsd token add NAME --role ROLE     create an API token in [server] tokens_file (printed once)
    dtsd token rm NAME                  revoke a token (servers notice within a second)
    dtsd token list                     names and roles

Exit codes of `dtsd` itself: 0 after a requested stop, 78 (EX_CONFIG) when the
configuration is refused or names a PostgreSQL database or role that does not exist (the
unit's RestartPreventExitStatus=78: restarting would not help; the log says the commands
that create them), 1 for anything else that stops it (address in use, an unreachable
database, another failed migration).
"""

from __future__ import annotations

import logging
import re
import sys

import click

from . import __version__
from . import config as configmod

CONFIG_HELP = f"Configuration file (default: $DTSD_CONFIG, else {configmod.DEFAULT_PATH})."
EXIT_CONFIG = 78          # as the children's (dtsd/child.py): the configuration is unusable
# The user the packaged unit runs the master as: --check-config, run as root, checks the
# files as this user can read them when it exists.
PACKAGED_USER = "dtsd"
RELOAD_TIMEOUT = 85.0     # under the unit's TimeoutStartSec=90, which also bounds ExecReload=


def _say(text: str, level: int = logging.ERROR) -> None:
    """A line on standard error; under journald with its priority (`<3>` for errors)."""
    from .child import journal_line
    click.echo(journal_line(text, level), err=True)


def _load(path: str | None, exit_code: int = 1) -> configmod.Config:
    try:
        return configmod.load(path)
    except configmod.ConfigError as exc:
        _say(f"dtsd: configuration error: {exc}")
        sys.exit(exit_code)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", "path", metavar="FILE", help=CONFIG_HELP)
@click.option("--check-config", is_flag=True,
              help="Run every check a start makes and exit (0: fine, 1: an error).")
@click.option("--user", "check_user", metavar="NAME",
              help="With --check-config: check that user NAME can read the files dtsd reads "
                   f"(default: {PACKAGED_USER} when run as root and that user exists, else "
                   "yourself without capabilities, as dtsd's children run).")
@click.option("--daemon", is_flag=True, help="Detach from the terminal (hosts without systemd).")
@click.option("--pidfile", metavar="FILE", help="With --daemon: write the master's pid here.")
@click.version_option(__version__, prog_name="dtsd")
@click.pass_context
def main(ctx: click.Context, path: str | None, check_config: bool, check_user: str | None,
         daemon: bool, pidfile: str | None) -> None:
    """dtsd, the distributed task scheduler daemon: runs the master, which supervises
    the gRPC API servers, the workers and the coordinator of this node."""
    if ctx.invoked_subcommand:
        ctx.obj = path
        return
    if check_user and not check_config:
        raise click.UsageError("--user goes with --check-config")
    cfg = _load(path, 1 if check_config else EXIT_CONFIG)
    if check_config:
        sys.exit(_check_config(cfg, check_user))
    if pidfile and not daemon:
        raise click.UsageError("--pidfile goes with --daemon")
    from . import checks
    from .child import setup_logging
    from .master import Master
    report = checks.preflight(cfg, checks.Occasion.START)
    if report.errors:       # before detaching: whoever starts it sees why
        for error in report.errors:
            _say(f"dtsd: refusing to start: {error}")
        sys.exit(EXIT_CONFIG)
    if daemon:
        sys.exit(_run_detached(cfg, pidfile, report))
    setup_logging(cfg, "master")
    sys.exit(Master(cfg, report).run())


def _check_config(cfg: configmod.Config, user: str | None) -> int:
    """--check-config: parse, then every check the master makes at start (dtsd/checks.py),
    with the file checks taken as the daemon's user. 1 on an error."""
    import os
    import pwd

    from . import checks
    if user is None and os.geteuid() == 0:
        try:
            pwd.getpwnam(PACKAGED_USER)
            user = PACKAGED_USER
        except KeyError:
            pass
    try:
        reader = checks.Reader.user(user) if user else checks.Reader.current()
    except KeyError:
        click.echo(f"dtsd: --user {user}: no such user", err=True)
        return 1
    report = checks.preflight(cfg, checks.Occasion.CHECK_CONFIG, reader=reader)
    for problem in report.problems:
        click.echo(f"dtsd: {problem.severity.value}: {problem.message}", err=True)
    if not report.ok:
        return 1
    click.echo(f"{cfg.path}: configuration is valid (files checked as {reader.name})")
    return 0


def _run_detached(cfg: configmod.Config, pidfile: str | None, report) -> int:
    """Detach with python-daemon; the signal handling of the master stays as it is.

    Logs go to `[dtsd] log_file`, or `<runtime_dir>/dtsd.log` when none is set (created
    0640): the detached process's stderr is that file, so the children's logs land there
    too. The pidfile is removed when the master exits.
    """
    import os

    import daemon as pydaemon
    from daemon import pidfile as pidlockfile

    from .child import open_log_file, setup_logging
    from .master import Master
    runtime_dir = cfg.get("dtsd", "runtime_dir")
    os.makedirs(runtime_dir, exist_ok=True)
    log_path = cfg.get("dtsd", "log_file") or os.path.join(runtime_dir, "dtsd.log")
    log_stream = open_log_file(log_path)
    lock = pidlockfile.TimeoutPIDLockFile(os.path.abspath(pidfile), acquire_timeout=5) \
        if pidfile else None
    context = pydaemon.DaemonContext(
        pidfile=lock, working_directory="/", umask=0o022, signal_map={},
        stdout=log_stream, stderr=log_stream, detach_process=True)
    with context:
        setup_logging(cfg, "master")
        return Master(cfg, report).run()


@main.command()
@click.option("--pid", type=int, metavar="PID",
              help="The master to reload (the unit passes $MAINPID). Default: the pid "
                   "recorded in <runtime_dir>/reload.json.")
@click.option("-c", "--config", "path", metavar="FILE", help=CONFIG_HELP)
@click.option("--timeout", type=float, default=RELOAD_TIMEOUT, show_default=True,
              metavar="SECONDS", help="Give up waiting for the verdict after this long.")
@click.pass_obj
def reload(parent_path: str | None, pid: int | None, path: str | None, timeout: float) -> None:
    """Reload the running master (HUP) and wait until it is done.

    Exits 0 once the new configuration runs (every child of it RUNNING, the old ones
    drained), 1 when the master refused the file (every start check runs on it; it keeps
    the running configuration), could not complete the reload, or did not answer in time.
    The reason goes to standard error, at error priority under journald. This is the
    unit's ExecReload=, so `systemctl reload dtsd` fails when the reload does.
    """
    import os
    import signal
    import time

    from .master import FINAL_STATES, ReloadState, read_verdict
    runtime_dir = configmod.peek(path or parent_path, "dtsd", "runtime_dir")
    if os.path.isdir(runtime_dir) and not os.access(runtime_dir, os.R_OK | os.X_OK):
        _say(f"dtsd reload: cannot read {runtime_dir}: run as root or as dtsd's user")
        sys.exit(1)
    before = read_verdict(runtime_dir)
    if before is None or (pid is not None and before["pid"] != pid):
        _say(f"dtsd reload: no master{f' with pid {pid}' if pid else ''} keeps its reload "
             f"verdict in {runtime_dir} (is it running, with this [dtsd] runtime_dir? a "
             "change of runtime_dir takes a restart)")
        sys.exit(1)
    pid = before["pid"]
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        _say(f"dtsd reload: cannot signal the master (pid {pid}): {exc.strerror}")
        sys.exit(1)
    deadline = time.monotonic() + timeout
    verdict = before
    while time.monotonic() < deadline:
        time.sleep(0.05)
        current = read_verdict(runtime_dir)
        if current is None or not _alive(pid):
            _say(f"dtsd reload: the master (pid {pid}) exited during the reload")
            sys.exit(1)
        verdict = current
        if verdict["seq"] > before["seq"] and verdict["state"] in FINAL_STATES:
            break
    else:
        _say(f"dtsd reload: not complete after {timeout:g}s ({verdict['state'].value}: "
             f"{verdict['message']}); the master goes on with it")
        sys.exit(1)
    if verdict["state"] is ReloadState.DONE:
        click.echo(f"dtsd reload: done ({verdict['message']})")
        return
    _say(f"dtsd reload: {verdict['state'].value}: {verdict['message']}")
    sys.exit(1)


def _alive(pid: int) -> bool:
    import os
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@main.command()
@click.option("-c", "--config", "path", metavar="FILE", help=CONFIG_HELP)
@click.pass_obj
def migrate(parent_path: str | None, path: str | None) -> None:
    """Apply the PostgreSQL migrations not applied yet (under an advisory lock); each one
    applied is logged (`applied migration NAME`).

    Exits 78 when the database or the role does not exist (the error names the commands
    that create them), 1 on any other failure.
    """
    from .child import setup_logging
    from .store import Store
    cfg = _load(path or parent_path)
    setup_logging(cfg, "migrate")
    store = Store(cfg.get("postgres", "dsn"))
    try:
        applied = store.migrate()
    except Exception as exc:  # report, don't trace: this runs at every start
        hint = _missing_database_hint(exc)
        logging.getLogger("dtsd.store").error("migration failed: %s: %s%s", type(exc).__name__,
                                              str(exc).rstrip(), hint)
        sys.exit(EXIT_CONFIG if hint else 1)
    if not applied:
        logging.getLogger("dtsd.store").info("the schema is up to date")


def _missing_database_hint(exc: Exception) -> str:
    """For `role "dtsd" does not exist` or `database "dtsd" does not exist`: the commands
    of the README's first start that create what is missing."""
    match = re.search(r'(database|role) "([^"]+)" does not exist', str(exc))
    if not match:
        return ""
    if match.group(1) == "database":
        return (f"; create it on the PostgreSQL host: sudo -u postgres createdb -O dtsd "
                f"{match.group(2)}")
    return (f"; create the role and its database on the PostgreSQL host: sudo -u postgres "
            f"createuser {match.group(2)} && sudo -u postgres createdb -O {match.group(2)} dtsd")


@main.command("config-reference")
def config_reference() -> None:
    """Print the reference dtsd.ini: every option, commented, with its default."""
    click.echo(configmod.reference_ini(), nl=False)


@main.group()
def token() -> None:
    """Manage the API tokens of [server] tokens_file (roles: read < submit < admin)."""


def _tokens_file(parent_path: str | None, path: str | None) -> tuple[str, configmod.Config]:
    cfg = _load(path or parent_path)
    tokens_file = cfg.get("server", "tokens_file")
    if not tokens_file:
        click.echo("dtsd token: [server] tokens_file is not set in the configuration "
                   "(set it, e.g. /etc/dtsd/tokens, to turn authentication on)", err=True)
        sys.exit(1)
    return tokens_file, cfg


def _config_group(cfg: configmod.Config) -> int | None:
    """The group of the configuration file (dtsd from the package): a tokens file created
    by `dtsd token add` gets it, so that the daemon reads both alike."""
    import os
    try:
        return os.stat(cfg.path).st_gid if cfg.from_file else None
    except OSError:
        return None


@token.command("add")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(["read", "submit", "admin"]),
              help="read: status and lists; submit: also submit, cancel, retry; "
                   "admin: also dead letters and schedules.")
@click.option("-c", "--config", "path", metavar="FILE", help=CONFIG_HELP)
@click.pass_obj
def token_add(parent_path: str | None, name: str, role: str, path: str | None) -> None:
    """Create token NAME and print its secret: the only time it is shown.

    A new tokens file is created mode 0640 with the configuration file's group (dtsd).
    """
    from . import auth
    tokens_file, cfg = _tokens_file(parent_path, path)
    try:
        secret = auth.add_token(tokens_file, name, role, group=_config_group(cfg),
                                lock_dir=cfg.get("dtsd", "runtime_dir"))
    except (auth.TokenError, OSError) as exc:
        click.echo(f"dtsd token add: {exc}", err=True)
        sys.exit(1)
    click.echo(secret)
    click.echo(f"token {name} ({role}) added to {tokens_file}; the secret above is not stored "
               "and cannot be shown again", err=True)


@token.command("rm")
@click.argument("name")
@click.option("-c", "--config", "path", metavar="FILE", help=CONFIG_HELP)
@click.pass_obj
def token_rm(parent_path: str | None, name: str, path: str | None) -> None:
    """Revoke token NAME; the servers refuse it within about a second."""
    from . import auth
    tokens_file, cfg = _tokens_file(parent_path, path)
    try:
        auth.remove_token(tokens_file, name, lock_dir=cfg.get("dtsd", "runtime_dir"))
    except (auth.TokenError, OSError) as exc:
        click.echo(f"dtsd token rm: {exc}", err=True)
        sys.exit(1)


@token.command("list")
@click.option("-c", "--config", "path", metavar="FILE", help=CONFIG_HELP)
@click.pass_obj
def token_list(parent_path: str | None, path: str | None) -> None:
    """Names and roles of the tokens (the secrets are not stored)."""
    from . import auth
    tokens_file, _ = _tokens_file(parent_path, path)
    try:
        tokens = auth.read_tokens(tokens_file)
    except (auth.TokenError, OSError) as exc:
        click.echo(f"dtsd token list: {exc}", err=True)
        sys.exit(1)
    for item in tokens:
        click.echo(f"{item.name}\t{item.role.value}")


if __name__ == "__main__":
    main()
