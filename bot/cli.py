"""The ``hopnhat`` command line (Typer). Imports are lazy so ``--help`` is instant."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from bot.config import ConfigError, Settings, load_settings

app = typer.Typer(
    help="hopnhat — trợ lý vận hành chuyển đổi hệ thống thông tin khi hợp nhất tỉnh "
         "(operations assistant for Vietnam's 2025 provincial merger).",
    no_args_is_help=True,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect the effective configuration.", no_args_is_help=True)
import_app = typer.Typer(help="Import unit and staff lists from CSV/XLSX.", no_args_is_help=True)
plan_app = typer.Typer(help="Export or re-import the plan (systems, milestones) as XLSX.",
                       no_args_is_help=True)
faq_app = typer.Typer(help="Add or edit knowledge-base entries from a file.",
                      no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(import_app, name="import")
app.add_typer(plan_app, name="plan")
app.add_typer(faq_app, name="faq")

CONSOLE_TOKEN = "1000000001:CONSOLE-offline-emulator-token-000000"


def _settings(**overrides: object) -> Settings:
    try:
        return load_settings(**overrides)
    except ConfigError as exc:
        typer.secho(f"Configuration error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def _logging(settings: Settings, quiet: bool = False) -> None:
    level = logging.WARNING if quiet else getattr(logging, settings.log_level.upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiogram.event").setLevel(logging.WARNING)


async def init_database(
    settings: Settings, *, sample: bool = True, echo: bool = True, link_sample: bool = False
) -> dict:
    """Create or upgrade the schema and load the national register, plan and sample data."""
    from db.migrate import upgrade_async
    from db.session import make_engine, make_sessionmaker
    from knowledge.plan import load_plan
    from services.audit import Actor
    from services.register import load_national_register
    from services.sample import load_sample_data

    await upgrade_async(settings.database_url)
    engine = make_engine(settings.database_url)
    actor = Actor.system("cli:init")
    out: dict = {}
    try:
        async with make_sessionmaker(engine)() as s:
            out["register"] = await load_national_register(s, actor)
            out["plan"] = await load_plan(s, actor)
            if sample:
                out["sample"] = await load_sample_data(s, actor, link_telegram=link_sample)
            await s.commit()
    finally:
        await engine.dispose()
    if echo:
        for k, v in out.items():
            typer.echo(f"{k}: {v}")
    return out


@app.command()
def init(
    sample: Annotated[bool, typer.Option(help="Also load the labelled sample staff.")] = True,
) -> None:
    """Create/upgrade the database (Alembic) and load the national register, plan and samples."""
    settings = _settings()
    _logging(settings, quiet=True)
    asyncio.run(init_database(settings, sample=sample))
    typer.echo(f"Database ready: {settings.masked()['HOPNHAT_DATABASE_URL']}")


def _run_until_signal(coro_factory) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await coro_factory(stop)

    from bot.app import run_loop

    run_loop(main())


@app.command()
def run(
    webhook: Annotated[bool, typer.Option(help="Serve a webhook instead of long polling.")] = False,
) -> None:
    """Run the bot (long polling by default). Without a token, starts the offline console."""
    settings = _settings()
    if settings.bot_token is None:
        typer.secho("HOPNHAT_BOT_TOKEN is not set: starting the offline console instead.",
                    fg=typer.colors.YELLOW, err=True)
        console()
        return
    _logging(settings)

    async def go(stop: asyncio.Event) -> None:
        from bot.app import build_app, run_polling, run_webhook
        from db.migrate import upgrade_async
        await upgrade_async(settings.database_url)
        app_ = build_app(settings)
        try:
            await (run_webhook if webhook else run_polling)(app_, stop)
        finally:
            await app_.close()

    try:
        _run_until_signal(go)
    except ConfigError as exc:
        typer.secho(f"Configuration error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


@app.command()
def console(
    database_url: Annotated[str | None, typer.Option(help="Override HOPNHAT_DATABASE_URL.")] = None,
) -> None:
    """Chat with the bot offline: emulator + real bot in one process, on the embedded SQLite."""
    overrides: dict[str, object] = {"bot_token": CONSOLE_TOKEN}
    if database_url:
        overrides["database_url"] = database_url
    settings = _settings(**overrides)
    from bot.console import run_console

    asyncio.run(run_console(settings))


@app.command()
def emulator(
    port: Annotated[int, typer.Option(help="TCP port on 127.0.0.1.")] = 8081,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    first_update_id: Annotated[int | None, typer.Option(
        help="First update id (default: from the clock, so ids keep growing across "
             "restarts and a bot with an older database does not drop them).")] = None,
) -> None:
    """Run the standalone Bot API emulator (point HOPNHAT_TELEGRAM_API_URL at it)."""
    import time

    from bot.emulator import Emulator
    from bot.emulator.server import FIRST_UPDATE_ID

    first = first_update_id or FIRST_UPDATE_ID + max(0, int(time.time()) - 1_780_000_000) * 10

    async def go(stop: asyncio.Event) -> None:
        emu = Emulator(first_update_id=first)
        url = await emu.start(host=host, port=port)
        typer.echo(f"Bot API emulator on {url} (control API under {url}/_emulator/)")
        await stop.wait()
        await emu.stop()

    _run_until_signal(go)


def _import(kind: str, file: Path, skip_invalid: bool, dry_run: bool) -> None:
    settings = _settings()
    _logging(settings, quiet=True)
    if not file.is_file():
        typer.secho(f"File not found: {file}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)

    data = file.read_bytes()

    async def go() -> int:
        from db.migrate import upgrade_async
        from db.session import make_engine, make_sessionmaker
        from services import imports, texts
        from services.audit import Actor

        await upgrade_async(settings.database_url)
        engine = make_engine(settings.database_url)
        fn = imports.import_staff if kind == "staff" else imports.import_units
        lang = settings.default_lang
        try:
            async with make_sessionmaker(engine)() as s:
                try:
                    report = await fn(s, data, file.name, Actor.system("cli:import"),
                                      skip_invalid=skip_invalid, dry_run=dry_run)
                except imports.ImportFileError as exc:
                    typer.secho(texts.t(f"import.file_err.{exc.code}", lang, **exc.detail),
                                fg=typer.colors.RED, err=True)
                    return 2
                from handlers.imports import render_report

                typer.echo(texts.strip_html(render_report(report, lang)))
                if report.applied:
                    await s.commit()
                    typer.secho("Applied.", fg=typer.colors.GREEN)
                    return 0
                typer.secho("Nothing applied" + (" (dry run)." if dry_run else
                            ": fix the rows above or pass --skip-invalid."), fg=typer.colors.YELLOW)
                return 0 if dry_run else 1
        finally:
            await engine.dispose()

    raise typer.Exit(asyncio.run(go()))


SkipOpt = Annotated[bool, typer.Option("--skip-invalid", help="Import valid rows, skip bad.")]
DryOpt = Annotated[bool, typer.Option("--dry-run", help="Check and report; change nothing.")]


@import_app.command("units")
def import_units(file: Path, skip_invalid: SkipOpt = False, dry_run: DryOpt = False) -> None:
    """Import units (code, name, kind, province_code, parent_code, merged_into, domain, active)."""
    _import("units", file, skip_invalid, dry_run)


@import_app.command("staff")
def import_staff(file: Path, skip_invalid: SkipOpt = False, dry_run: DryOpt = False) -> None:
    """Import staff (full_name, phone, unit_code, position, email, role)."""
    _import("staff", file, skip_invalid, dry_run)


async def _with_session(settings: Settings, work):  # type: ignore[no-untyped-def]
    from db.migrate import upgrade_async
    from db.session import make_engine, make_sessionmaker

    await upgrade_async(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        async with make_sessionmaker(engine)() as s:
            return await work(s)
    finally:
        await engine.dispose()


@plan_app.command("export")
def plan_export(file: Path) -> None:
    """Write the plan as it is in the database to FILE (.xlsx) for editing."""
    settings = _settings()
    _logging(settings, quiet=True)
    from knowledge.plan import export_plan_xlsx, plan_from_db

    async def work(s):  # type: ignore[no-untyped-def]
        return export_plan_xlsx(await plan_from_db(s))

    file.write_bytes(asyncio.run(_with_session(settings, work)))
    typer.echo(f"Plan written to {file}")


@plan_app.command("import")
def plan_import(file: Path, dry_run: DryOpt = False) -> None:
    """Load an edited plan workbook: dates, systems, milestones (every bad row reported)."""
    settings = _settings()
    _logging(settings, quiet=True)
    from knowledge.plan import PlanError, import_plan_xlsx, load_plan
    from services.audit import Actor

    if not file.is_file():
        typer.secho(f"File not found: {file}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    try:
        plan = import_plan_xlsx(file.read_bytes())
    except PlanError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None

    async def work(s):  # type: ignore[no-untyped-def]
        result = await load_plan(s, Actor.system("cli:plan"), plan)
        if not dry_run:
            await s.commit()
        return result

    typer.echo(asyncio.run(_with_session(settings, work)))
    typer.echo("Dry run: nothing changed." if dry_run else "Plan applied.")


@faq_app.command("import")
def faq_import(file: Path) -> None:
    """Validate FILE (TOML/CSV/XLSX) and keep it: the bot applies it at its next start
    (operators can also send it in chat with /import to apply it live)."""
    settings = _settings()
    from knowledge.search import KnowledgeError
    from knowledge.store import add_faq_file, load_knowledge

    if not file.is_file():
        typer.secho(f"File not found: {file}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    try:
        result = add_faq_file(load_knowledge(settings.data_dir), settings.data_dir,
                              file.read_bytes(), file.name)
    except KnowledgeError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    typer.echo(f"added {len(result['added'])}, edited {len(result['updated'])}")


def _directory(settings: Settings):  # type: ignore[no-untyped-def]
    from services.directory import LdapDirectory

    if not settings.ldap_url:
        return None
    password = settings.ldap_password.get_secret_value() if settings.ldap_password else ""
    return LdapDirectory(settings.ldap_url, settings.ldap_base_dn, settings.ldap_bind_dn,
                         password)


def _print_plan(p, lang: str) -> None:  # type: ignore[no-untyped-def]
    from handlers.imports import render_report
    from services import texts

    if p.report.errors:
        typer.echo(texts.strip_html(render_report(p.report, lang)))
    typer.echo(f"accounts to create: {len(p.create)}")
    for r in p.create[:50]:
        mark = "  (numbered: address taken)" if r in p.collisions else ""
        typer.echo(f"  row {r.row}: {r.full_name} → {r.address}{mark}")
    typer.echo(f"address collisions: {len(p.collisions)}")
    typer.echo(f"already have an account: {len(p.existing)}")
    for r in p.existing[:50]:
        typer.echo(f"  row {r.row}: {r.full_name} ({r.address})")
    typer.echo(f"invalid rows: {p.report.error_rows + len(p.invalid)}")
    for r in p.invalid[:50]:
        typer.echo(f"  row {r.row}: {r.full_name}: {texts.t(r.note or '', lang)}")


@app.command("provision")
def provision(
    file: Path, dry_run: DryOpt = False,
    out: Annotated[Path | None, typer.Option("--out", help="Result XLSX (addresses).")] = None,
) -> None:
    """Official mailboxes for everyone on a staff list (CSV/XLSX): dry run, or create them
    in the directory with progress, then write a result XLSX of addresses (no passwords)."""
    settings = _settings()
    _logging(settings, quiet=True)
    if not file.is_file():
        typer.secho(f"File not found: {file}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    directory = _directory(settings)
    if directory is None and not dry_run:
        typer.secho("HOPNHAT_LDAP_URL: required to create accounts", fg=typer.colors.RED,
                    err=True)
        raise typer.Exit(2)
    data = file.read_bytes()
    lang = settings.default_lang
    result_path = out or file.with_name(file.stem + "-accounts.xlsx")

    async def go() -> int:
        from db.migrate import upgrade_async
        from db.session import make_engine, make_sessionmaker
        from services import bulk_provision, imports, texts
        from services.audit import Actor
        from services.directory import DirectoryUnavailable
        from tasks.provisioning import Provisioner

        await upgrade_async(settings.database_url)
        engine = make_engine(settings.database_url)
        maker = make_sessionmaker(engine)
        actor = Actor.system("cli:provision")
        try:
            async with maker() as s:
                try:
                    if dry_run:
                        try:
                            p = await bulk_provision.plan(
                                s, directory, data, file.name, pattern=settings.address_pattern,
                                mail_domain=settings.mail_domain)
                        except DirectoryUnavailable:
                            typer.secho("Directory unreachable: collisions checked against "
                                        "the database only.", fg=typer.colors.YELLOW)
                            p = await bulk_provision.plan(
                                s, None, data, file.name, pattern=settings.address_pattern,
                                mail_domain=settings.mail_domain)
                        _print_plan(p, lang)
                        typer.secho("Dry run: nothing changed.", fg=typer.colors.YELLOW)
                        return 0
                    batch, p = await bulk_provision.submit(
                        s, data, file.name, None, actor, pattern=settings.address_pattern,
                        mail_domain=settings.mail_domain)
                    await s.commit()
                except imports.ImportFileError as exc:
                    typer.secho(texts.t(f"import.file_err.{exc.code}", lang, **exc.detail),
                                fg=typer.colors.RED, err=True)
                    return 2
            _print_plan(p, lang)
            total = len(p.create)
            done = 0

            def progress(_batch: str, n: int, _chunk: int) -> None:
                nonlocal done
                done += n
                typer.echo(texts.strip_html(texts.t("prov.bulk_progress", lang, done=done,
                                                    total=total)))

            worker = Provisioner.from_settings(maker, directory, settings)
            worker.on_progress = progress
            await worker.run_until_idle()
            async with maker() as s:
                counts = await bulk_provision.batch_counts(s, batch)
                result_path.write_bytes(await bulk_provision.result_xlsx(s, batch, lang))
            typer.echo(f"batch {batch}: " + ", ".join(f"{k} {v}" for k, v in
                                                      sorted(counts.items())))
            typer.echo(f"Result written to {result_path}")
            waiting = sum(v for k, v in counts.items() if k not in ("done", "failed"))
            if waiting:
                typer.secho(f"{waiting} jobs wait for the directory; the bot's task retries "
                            "them.", fg=typer.colors.YELLOW)
            return 0 if not waiting and not counts.get("failed") else 1
        finally:
            await directory.close() if directory is not None else None
            await engine.dispose()

    raise typer.Exit(asyncio.run(go()))


@config_app.command("show")
def config_show() -> None:
    """Print the effective configuration with secrets masked."""
    settings = _settings()
    for key, value in settings.masked().items():
        typer.echo(f"{key}={value}")


@app.command()
def sender(
    name: Annotated[str | None, typer.Option(help="Sender name (default HOPNHAT_SENDER_NAME); "
                                             "two senders running at once need two names.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Sends in flight at once.")] = None,
) -> None:
    """Run the outbox sender alone: delivers broadcasts and reminders from the ledger."""
    settings = _settings()
    if settings.bot_token is None:
        typer.secho("HOPNHAT_BOT_TOKEN is not set.", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    _logging(settings)

    async def go(stop: asyncio.Event) -> None:
        from bot.background import sender_process
        from db.migrate import upgrade_async

        await upgrade_async(settings.database_url)
        await sender_process(settings, stop, name=name, concurrency=concurrency)

    from tasks.sender import SenderNameInUse

    try:
        _run_until_signal(go)
    except SenderNameInUse as exc:
        typer.secho(f"Not started: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


broadcast_app = typer.Typer(help="Send, schedule, list, pause, resume or cancel broadcasts.",
                            no_args_is_help=True)
reminders_app = typer.Typer(help="Deadline reminders from the plan's milestones.",
                            no_args_is_help=True)
app.add_typer(broadcast_app, name="broadcast")
app.add_typer(reminders_app, name="reminders")


def _bc_error(exc: Exception, lang: str) -> None:
    from services import texts

    code = getattr(exc, "code", "state")
    typer.secho(texts.strip_html(texts.t(f"bc.err.{code}", lang, **getattr(exc, "detail", {}))),
                fg=typer.colors.RED, err=True)


@broadcast_app.command("send")
def broadcast_send(
    text: Annotated[str, typer.Argument(help="Jinja2 template: {{ name }}, {{ unit }}, "
                                             "{{ province }}, {{ role }}.")],
    province: Annotated[str | None, typer.Option(help="Province code, e.g. 79.")] = None,
    kind: Annotated[list[str] | None, typer.Option(help="Unit kind (repeatable).")] = None,
    role: Annotated[list[str] | None, typer.Option(help="Role (repeatable).")] = None,
    system: Annotated[str | None, typer.Option(help="System code for --stage-group.")] = None,
    stage_group: Annotated[str | None, typer.Option(help="behind | deployed | live")] = None,
    subscribers: Annotated[str | None, typer.Option(help="Only people not opted out of "
                                                         "this system.")] = None,
    at: Annotated[str | None, typer.Option(help="Schedule: 'dd/mm/yyyy hh:mm' local time.")] = None,
    dry_run: DryOpt = False,
) -> None:
    """Preview a broadcast for its first recipient with the count, then send or schedule it
    (a running bot or `hopnhat sender` delivers it)."""
    settings = _settings()
    _logging(settings, quiet=True)
    from datetime import datetime

    from services import broadcasts, texts
    from services.audit import Actor

    stages = broadcasts.STAGE_GROUPS.get(stage_group or "", ()) if stage_group else ()
    if stage_group and (not stages or not system):
        typer.secho("--stage-group needs --system and one of behind, deployed, live",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    audience = broadcasts.Audience(province=province, unit_kinds=tuple(kind or ()),
                                   roles=tuple(role or ()), system=system, stages=stages,
                                   subscribers=subscribers)
    when = None
    if at is not None:
        try:
            when = datetime.strptime(at.strip(), "%d/%m/%Y %H:%M").replace(tzinfo=settings.tz)
        except ValueError:
            typer.secho(f"Cannot read --at {at!r}: use dd/mm/yyyy hh:mm", fg=typer.colors.RED,
                        err=True)
            raise typer.Exit(2) from None
    lang = settings.default_lang
    actor = Actor.system("cli:broadcast")

    async def work(s):  # type: ignore[no-untyped-def]
        try:
            audience.validate()
            preview, count = await broadcasts.preview(s, text, audience)
        except broadcasts.BroadcastError as exc:
            _bc_error(exc, lang)
            return 1
        typer.echo(texts.strip_html(preview))
        typer.echo(f"recipients: {count}")
        if dry_run:
            typer.echo("Dry run: nothing sent.")
            return 0
        try:
            b = await broadcasts.create(s, actor, text, audience, lang)
            if when is not None:
                await broadcasts.schedule(s, b.id, when, actor)
                typer.echo(f"Broadcast #{b.id} scheduled for {when:%d/%m/%Y %H:%M}.")
            else:
                n = await broadcasts.start(s, b.id, actor)
                typer.echo(f"Broadcast #{b.id} queued for {n} recipients.")
        except broadcasts.BroadcastError as exc:
            _bc_error(exc, lang)
            return 1
        await s.commit()
        return 0

    raise typer.Exit(asyncio.run(_with_session(settings, work)))


@broadcast_app.command("list")
def broadcast_list() -> None:
    """Broadcasts, newest first, with their progress."""
    settings = _settings()
    _logging(settings, quiet=True)
    from sqlalchemy import select

    from db.models import Broadcast
    from services import broadcasts

    async def work(s):  # type: ignore[no-untyped-def]
        for b in await s.scalars(select(Broadcast).order_by(Broadcast.id.desc()).limit(50)):
            p = await broadcasts.progress(s, b.id)
            when = f" at {b.scheduled_at:%Y-%m-%d %H:%M}Z" if b.scheduled_at else ""
            typer.echo(f"#{p.id} {p.state}{when}: sent {p.sent}/{p.total}, blocked {p.blocked}, "
                       f"failed {p.failed}, remaining {p.remaining}, resent {p.uncertain}")

    asyncio.run(_with_session(settings, work))


def _broadcast_action(action: str, broadcast_id: int) -> None:
    settings = _settings()
    _logging(settings, quiet=True)
    from services import broadcasts
    from services.audit import Actor

    async def work(s):  # type: ignore[no-untyped-def]
        try:
            b = await broadcasts.act(s, broadcast_id, broadcasts.Action(action),
                                     Actor.system("cli:broadcast"))
        except broadcasts.BroadcastError as exc:
            _bc_error(exc, settings.default_lang)
            return 1
        await s.commit()
        typer.echo(f"Broadcast #{b.id}: {b.state}")
        return 0

    raise typer.Exit(asyncio.run(_with_session(settings, work)))


@broadcast_app.command("pause")
def broadcast_pause(broadcast_id: int) -> None:
    """Pause a broadcast that is sending."""
    _broadcast_action("pause", broadcast_id)


@broadcast_app.command("resume")
def broadcast_resume(broadcast_id: int) -> None:
    """Resume a paused broadcast."""
    _broadcast_action("resume", broadcast_id)


@broadcast_app.command("cancel")
def broadcast_cancel(broadcast_id: int) -> None:
    """Cancel a broadcast: what is not sent yet will never be."""
    _broadcast_action("cancel", broadcast_id)


@reminders_app.command("plan")
def reminders_plan(
    now: Annotated[str | None, typer.Option(help="Plan as of this ISO time (default now).")]
    = None,
) -> None:
    """Plan today's reminders, nags and digests now (idempotent; the bot does it daily)."""
    settings = _settings()
    _logging(settings, quiet=True)
    from datetime import UTC, datetime

    from services import reminders
    from services.audit import Actor

    moment = datetime.now(UTC)
    if now:
        moment = datetime.fromisoformat(now)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=settings.tz)

    async def work(s):  # type: ignore[no-untyped-def]
        result = await reminders.plan(s, moment, tz=settings.tz,
                                      offsets=settings.reminder_offsets,
                                      actor=Actor.system("cli:reminders"))
        await s.commit()
        return result

    r = asyncio.run(_with_session(settings, work))
    typer.echo(f"planned: {r.due} reminders, {r.nags} overdue nags, {r.digests} digests "
               "(already planned ones are not repeated)")




def main() -> None:
    try:
        app()
    except ConfigError as exc:  # raised lazily by factories
        typer.secho(f"Configuration error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
