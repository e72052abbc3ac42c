"""`dtsd`: the daemon's command line.

    dtsd [-c FILE]                      run the master in the foreground
    dtsd --check-config [-c FILE]       validate the configuration and exit (0: fine)
    dtsd --daemon --pidfile FILE        detach (for hosts without systemd)
    dtsd migrate [-c FILE]              bring the PostgreSQL schema up to date
    dtsd config-reference               print the reference dtsd.ini (every option, default)
    dtsd token add NAME --role ROLE     create an API token in [server] tokens_file (printed once)
    dtsd token rm NAME                  revoke a token (servers notice within a second)
    dtsd token list                     names and roles
"""

from __future__ import annotations

import sys

import click

from . import __version__
from . import config as configmod

CONFIG_HELP = f"Configuration file (default: $DTSD_CONFIG, else {configmod.DEFAULT_PATH})."


def _load(path: str | None) -> configmod.Config:
    try:
        return configmod.load(path)
    except configmod.ConfigError as exc:
        click.echo(f"dtsd: configuration error: {exc}", err=True)
        sys.exit(1)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", "path", metavar="FILE", help=CONFIG_HELP)
@click.option("--check-config", is_flag=True, help="Validate the configuration and exit.")
@click.option("--daemon", is_flag=True, help="Detach from the terminal (hosts without systemd).")
@click.option("--pidfile", metavar="FILE", help="With --daemon: write the master's pid here.")
@click.version_option(__version__, prog_name="dtsd")
@click.pass_context
def main(ctx: click.Context, path: str | None, check_config: bool, daemon: bool,
         pidfile: str | None) -> None:
    """dtsd, the distributed task scheduler daemon: runs the master, which supervises
    the gRPC API servers, the workers and the coordinator of this node."""
    if ctx.invoked_subcommand:
        ctx.obj = path
        return
    cfg = _load(path)
    if check_config:
        sys.exit(_check_config(cfg))
    if pidfile and not daemon:
        raise click.UsageError("--pidfile goes with --daemon")
    from .child import setup_logging
    from .master import Master
    error, warning = configmod.secrets_exposure(cfg)
    if error:   # before detaching: whoever starts it sees why
        click.echo(f"dtsd: {error}", err=True)
        sys.exit(1)
    if daemon:
        sys.exit(_run_detached(cfg, pidfile))
    setup_logging(cfg, "master")
    _warn_secrets(warning)
    sys.exit(Master(cfg).run())


def _check_config(cfg: configmod.Config) -> int:
    """--check-config: parse, then the checks the master makes before starting anything
    (who may read the secrets, who may reach the listen address) and that the job user
    exists. 1 on an error."""
    failed = False
    from .jobbox import job_user_exposure
    for error, warning in (configmod.secrets_exposure(cfg), configmod.server_exposure(cfg),
                           job_user_exposure(cfg)):
        for problem in (error, warning):
            if problem:
                click.echo(f"dtsd: {problem}", err=True)
        failed = failed or bool(error)
    if failed:
        return 1
    click.echo(f"{cfg.path}: configuration is valid")
    return 0


def _warn_secrets(warning: str | None) -> None:
    if warning:
        import logging
        logging.getLogger("dtsd.master").warning("SECRETS EXPOSED: %s", warning)


def _run_detached(cfg: configmod.Config, pidfile: str | None) -> int:
    """Detach with python-daemon; the signal handling of the master stays as it is.

    Logs go to `[dtsd] log_file`, or `<runtime_dir>/dtsd.log` when none is set: the
    detached process's stderr is that file, so the children's logs land there too.
    The pidfile is removed when the master exits.
    """
    import os

    import daemon as pydaemon
    from daemon import pidfile as pidlockfile

    from .child import setup_logging
    from .master import Master
    runtime_dir = cfg.get("dtsd", "runtime_dir")
    os.makedirs(runtime_dir, exist_ok=True)
    log_path = cfg.get("dtsd", "log_file") or os.path.join(runtime_dir, "dtsd.log")
    log_stream = open(log_path, "a", buffering=1, encoding="utf-8")
    lock = pidlockfile.TimeoutPIDLockFile(os.path.abspath(pidfile), acquire_timeout=5) \
        if pidfile else None
    context = pydaemon.DaemonContext(
        pidfile=lock, working_directory="/", umask=0o022, signal_map={},
        stdout=log_stream, stderr=log_stream, detach_process=True)
    with context:
        setup_logging(cfg, "master")
        _warn_secrets(configmod.secrets_exposure(cfg)[1])
        return Master(cfg).run()


@main.command()
@click.option("-c", "--config", "path", metavar="FILE", help=CONFIG_HELP)
@click.pass_obj
def migrate(parent_path: str | None, path: str | None) -> None:
    """Apply the PostgreSQL migrations not applied yet (under an advisory lock)."""
    from .store import Store
    cfg = _load(path or parent_path)
    store = Store(cfg.get("postgres", "dsn"))
    try:
        applied = store.migrate()
    except Exception as exc:  # report, don't trace: this runs at every start
        click.echo(f"dtsd migrate: {type(exc).__name__}: {exc}".rstrip(), err=True)
        sys.exit(1)
    for name in applied:
        click.echo(f"applied {name}")


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
