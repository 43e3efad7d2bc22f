"""`dolphin deploy`: register the pipeline as a Prefect deployment on a schedule.

The deployment runs `flows/pipeline.py:scheduled_pipeline` with the Hydra overrides as its parameters, so a
worker composes exactly the config `dolphin run -m <overrides>` would. The cron comes from `--cron` or the
config's schedule group (`schedule=nightly`, conf/schedule/). The work pool (type process) is created
when missing. Needs a Prefect server: PREFECT_API_URL.
"""
from __future__ import annotations

import argparse
import os

DEFAULT_POOL = "dolphin"
ENTRYPOINT = "flows/pipeline.py:scheduled_pipeline"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="register the pipeline as a scheduled Prefect deployment")
    p.add_argument("overrides", nargs="*", help="Hydra overrides the runs compose their config from; "
                   "comma lists sweep (gpu=a10,h100); schedule=nightly takes the cron from conf/schedule/")
    p.add_argument("--cron", help='cron schedule, e.g. "0 3 * * *" (default: the config\'s schedule.cron; '
                   "none: runs only when triggered)")
    p.add_argument("--timezone", help="the cron's time zone (default: schedule.timezone, else UTC)")
    p.add_argument("--name", default="dolphin-sweep", help="deployment name (default dolphin-sweep)")
    p.add_argument("--work-pool", default=DEFAULT_POOL, help=f"process work pool (default {DEFAULT_POOL}; "
                   "created when missing). Start a worker: prefect worker start --pool <pool>")
    p.add_argument("--no-force", action="store_true", help="let scheduled runs skip configs already measured "
                   "(default: every scheduled run re-measures)")
    p.add_argument("--json", action="store_true")


def schedule_from(overrides: list[str], cron: str | None, timezone: str | None) -> dict | None:
    """The cron and time zone: the flags win over the config's `schedule` group; every config of the sweep
    is composed and validated here, so a bad override fails now rather than at 3 a.m."""
    from tasks.compose import compose_config, expand_sweep, split_run_control
    from tasks.config import load_config

    control = {}
    for combo in expand_sweep(overrides):
        try:
            resolved, control = split_run_control(compose_config(combo))
        except Exception as exc:  # Hydra's errors: one line, no traceback
            raise ValueError(" ".join(str(exc).split())) from None
        load_config(resolved)
    sched = control.get("schedule") or {}
    cron = cron or sched.get("cron")
    if not cron:
        return None
    from prefect.schedules import validate_cron_string

    try:
        validate_cron_string(cron)
    except ValueError as exc:
        raise ValueError(f"--cron {cron!r}: {exc}") from None
    return {"cron": cron, "timezone": timezone or sched.get("timezone") or "UTC"}


def ensure_work_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            except ObjectAlreadyExists:  # created meanwhile by a teammate
                pass


def run(args: argparse.Namespace) -> int:
    import json

    from prefect.schedules import Cron

    from flows.pipeline import scheduled_pipeline
    from tasks.paths import REPO_ROOT

    if not os.environ.get("PREFECT_API_URL"):
        raise ValueError("a deployment lives on a Prefect server: set PREFECT_API_URL "
                         "(e.g. http://127.0.0.1:4200/api after `prefect server start`)")
    sched = schedule_from(args.overrides, args.cron, args.timezone)
    ensure_work_pool(args.work_pool)
    params = {"overrides": list(args.overrides), "force": not args.no_force}
    flow = scheduled_pipeline.from_source(source=str(REPO_ROOT), entrypoint=ENTRYPOINT)
    deployment_id = flow.deploy(
        name=args.name, work_pool_name=args.work_pool, parameters=params, build=False, push=False,
        schedules=[Cron(sched["cron"], timezone=sched["timezone"])] if sched else None,
        tags=["dolphin"], description="dolphin run -m " + " ".join(args.overrides), print_next_steps=False,
    )
    full_name = f"{scheduled_pipeline.name}/{args.name}"
    if args.json:
        print(json.dumps({"deployment_id": str(deployment_id), "name": full_name, "work_pool": args.work_pool,
                          "schedule": sched, "parameters": params}))
    else:
        when = f"cron {sched['cron']} ({sched['timezone']})" if sched else "no schedule (trigger it by hand)"
        print(f"deployment {full_name} ({deployment_id}): {when}, work pool {args.work_pool}\n"
              f"  worker:  prefect worker start --pool {args.work_pool}\n"
              f"  run now: prefect deployment run '{full_name}'")
    return 0
