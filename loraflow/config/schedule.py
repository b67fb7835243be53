"""When a job retrains by itself: the cron schedule of its `finetune/<job>` deployment (loraflow up / deploy)."""

from __future__ import annotations

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator

from loraflow.config.base import Section


class ScheduleConfig(Section):
    """A cron schedule for `finetune/<job>`. A run that finds no new data is a cached no-op, so a frequent schedule
    costs little; one that finds new data trains, is judged against the champion, and is served if it earns it."""

    cron: str = Field(description="Five cron fields (minute hour day-of-month month day-of-week), e.g. "
                      "`0 3 * * 0`: Sundays at 03:00 in `timezone`.")
    timezone: str = Field(default="UTC", description="The IANA time zone the cron is read in, e.g. `Asia/Seoul`.")
    active: bool = Field(default=True, description="False: deployed paused. `loraflow up` also leaves it paused on a "
                         "machine without the job's device, and never resumes a schedule a person paused.")

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, cron: str) -> str:
        # The full grammar is checked when the deployment is made (Prefect's CronSchedule), naming this field.
        if len(cron.split()) != 5:
            raise ValueError(f"a cron expression has 5 fields (minute hour day month weekday), got {cron!r}")
        return cron

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, timezone: str) -> str:
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {timezone!r} (an IANA name such as `Asia/Seoul`)") from None
        return timezone
