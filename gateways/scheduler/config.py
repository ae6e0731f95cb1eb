"""The ``scheduler:`` section of an integration file. Field descriptions are the YAML reference."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from core.config import GatewayConfig, Section, YamlType
from core.types import check_channel_name
from gateways.scheduler.translate import (
    Overlap,
    Policy,
    ReportDone,
    Spec,
    check_cron,
    check_jitter,
    check_message,
    check_overlap,
    check_schedule_id,
    check_timezone,
    parse_duration,
    parse_instant,
)

__all__ = ["ScheduleConfig", "SchedulerConfig", "SchedulerGatewayConfig"]

Duration = Annotated[float, BeforeValidator(parse_duration), YamlType("duration")]
#: read by the ``_instant`` validator below (it needs the schedule's ``timezone``)
Instant = Annotated[float, YamlType("date-time")]
ScheduleId = Annotated[str, AfterValidator(check_schedule_id)]


class ScheduleConfig(Section):
    """One entry of ``scheduler.schedules`` (its key is the schedule id): exactly one of
    ``cron``, ``every`` or ``at``."""

    timezone: Annotated[str, AfterValidator(check_timezone)] = Field(
        default="UTC",
        description="IANA zone the cron fields, and naive at/start/end times, are read in.",
    )
    cron: Annotated[str, AfterValidator(check_cron)] | None = Field(
        default=None,
        description="Cron expression: 5 fields (minute hour day month weekday) or 6 with "
        "seconds first; cronsim syntax (L, #, names).",
    )
    every: Duration | None = Field(
        default=None,
        description="Interval (30s, 5m, 1h, 1h30m or seconds), due at start + k x every "
        "(start default: the Unix epoch, so every: 1h is due on the hour UTC).",
    )
    at: Instant | None = Field(
        default=None,
        description="One-shot: ISO 8601 date-time (naive = in timezone). Once it is past (fired, "
        "or passed before the schedule existed) it is skipped with one INFO line.",
    )
    start: Instant | None = Field(
        default=None, description="ISO 8601 date-time: nothing is due before it."
    )
    end: Instant | None = Field(default=None, description="ISO 8601 date-time: nothing after it.")
    jitter: Duration = Field(
        default=0.0,
        description="Each fire is delayed by a fixed pseudo-random part of this (the same on "
        "every replica); at most the interval (every, or the cron's shortest gap).",
    )
    channel: str | None = Field(
        default=None, description="Channel the fires go to; default: the integration's channel."
    )
    message: dict[str, Any] | None = Field(
        default=None,
        description="With a type: sent as it is (e.g. an email.send). Without: its keys are "
        "added to the scheduler.fire message.",
    )
    misfire: Policy | None = Field(
        default=None, description="skip, once or all; default: scheduler.misfire."
    )
    misfire_cap: int | None = Field(
        default=None, ge=1, description="With all: at most this many; default scheduler's."
    )
    misfire_grace: Duration | None = Field(
        default=None, description="Lateness still on time; default: scheduler.misfire_grace."
    )
    overlap: Overlap | None = Field(
        default=None,
        description="While a run has not reported scheduler.done: allow, skip, buffer_one or "
        "cancel_other; default: scheduler.overlap.",
    )
    run_timeout: Duration | None = Field(
        default=None,
        gt=0,
        description="A run that never reports is finished this long after it was sent; "
        "default: scheduler.run_timeout.",
    )
    report_done: ReportDone = Field(
        default="worker",
        description="Who sends scheduler.done: worker (ConsumerWorker, after the handler "
        "returned) or consumer (the consumer itself).",
    )

    @field_validator("at", "start", "end", mode="before")
    @classmethod
    def _instant(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return None
        return parse_instant(value, info.data.get("timezone") or "UTC")

    @field_validator("jitter")
    @classmethod
    def _jitter(cls, value: float, info: ValidationInfo) -> float:
        return check_jitter(
            value,
            every=info.data.get("every"),
            cron=info.data.get("cron"),
            timezone=info.data.get("timezone") or "UTC",
        )

    @field_validator("overlap")
    @classmethod
    def _overlap(cls, value: Overlap | None, info: ValidationInfo) -> Overlap | None:
        return None if value is None else check_overlap(value, info.data.get("message"))

    @field_validator("every")
    @classmethod
    def _positive(cls, value: float | None) -> float | None:
        if value is not None and value <= 0:
            raise ValueError("must be longer than 0 s")
        return value

    _check_channel = field_validator("channel")(check_channel_name)

    @model_validator(mode="after")
    def _one_kind(self) -> ScheduleConfig:
        kinds = [k for k in ("cron", "every", "at") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of cron, every, at")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError("end must be after start")
        return self

    @field_validator("message")
    @classmethod
    def _message(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else dict(check_message(value) or {})


class SchedulerConfig(Section):
    """``scheduler:`` — the schedules and how they fire."""

    schedules: dict[ScheduleId, ScheduleConfig] = Field(
        default_factory=dict,
        description="Schedule id (1-200 letters, digits, _ . : @ -) → schedule (YAML schedules).",
    )
    misfire: Policy = Field(
        default="once",
        description="Default misfire policy: what fires of due times more than misfire_grace "
        "late (scheduler down, no leader, layer full): skip, once (the newest), all (up to "
        "misfire_cap).",
    )
    misfire_cap: int = Field(default=100, ge=1, description="Default cap for misfire: all.")
    misfire_grace: Duration = Field(
        default=60.0,
        description="A fire later than this is a misfire (policy applies); a fire the layer "
        "refuses is retried until then, then counted missed.",
    )
    tick: Duration = Field(
        default=1.0,
        gt=0,
        description="Leadership period (s): a standby takes over within two ticks of the "
        "leader's death.",
    )
    lease_ttl: Duration | None = Field(
        default=None, gt=0, description="Lease lifetime (s); default 1.5 x tick."
    )
    state_file: str | None = Field(
        default=None,
        description="SQLite file for state when the layer is not Redis; default "
        "NAME.scheduler.sqlite3 in the working directory.",
    )
    max_schedules: int = Field(
        default=100_000, ge=1, description="Run-time schedules kept; more adds are refused."
    )
    remember_done: Duration = Field(
        default=86400.0,
        description="How long a fired run-time one-shot's id is remembered, so a retried "
        "scheduler.add with that id does not schedule it again.",
    )
    max_in_flight: int = Field(
        default=100, ge=1, le=10_000, description="Fires sent to the layer at once."
    )
    list_limit: int = Field(
        default=1000, ge=1, le=10_000, description="Most schedules in one scheduler.list answer."
    )
    overlap: Overlap = Field(
        default="allow",
        description="Default overlap policy (schedules whose message has no type of its own).",
    )
    run_timeout: Duration = Field(
        default=3600.0, gt=0, description="Default run_timeout: a run that never reports done."
    )
    history_size: int = Field(
        default=20, ge=0, le=1000, description="Fires kept per schedule in its run history."
    )
    backfill_limit: int = Field(
        default=1000, ge=1, le=10_000, description="Most due times one scheduler.backfill fires."
    )
    schedule_metrics: Literal["yaml", "all", "none"] = Field(
        default="yaml",
        description="Which schedules get per-schedule series in /metrics: yaml (the file's), all "
        "(also run-time ones: one series set each), none.",
    )

    @property
    def lease_seconds(self) -> float:
        return self.lease_ttl if self.lease_ttl is not None else 1.5 * self.tick

    def defaults(self) -> dict[str, Any]:
        return {
            "misfire": self.misfire,
            "misfire_cap": self.misfire_cap,
            "misfire_grace": self.misfire_grace,
            "overlap": self.overlap,
            "run_timeout": self.run_timeout,
        }

    def specs(self, default_channel: str) -> list[Spec]:
        """The YAML schedules as :class:`Spec`, with the section's defaults filled in."""
        out = []
        for id_, entry in self.schedules.items():
            kind: Literal["cron", "every", "at"] = (
                "cron" if entry.cron else "every" if entry.every else "at"
            )
            out.append(
                Spec(
                    id=id_,
                    kind=kind,
                    channel=entry.channel or default_channel,
                    cron=entry.cron,
                    timezone=entry.timezone,
                    every=entry.every,
                    at=entry.at,
                    start=entry.start,
                    end=entry.end,
                    jitter=entry.jitter,
                    misfire=entry.misfire or self.misfire,
                    misfire_cap=entry.misfire_cap or self.misfire_cap,
                    misfire_grace=(
                        self.misfire_grace if entry.misfire_grace is None else entry.misfire_grace
                    ),
                    message=entry.message,
                    source="yaml",
                    # the section's default reaches only schedules that can report runs
                    overlap=entry.overlap
                    or (self.overlap if not (entry.message or {}).get("type") else "allow"),
                    run_timeout=(
                        self.run_timeout if entry.run_timeout is None else entry.run_timeout
                    ),
                    report_done=entry.report_done,
                )
            )
        return out


class SchedulerGatewayConfig(GatewayConfig):
    """A scheduler integration file."""

    gateway: Literal["scheduler"]
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
