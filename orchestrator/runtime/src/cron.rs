//! CronJob schedules as Kubernetes reads them: a standard five-field cron
//! line (or a descriptor such as `@hourly`), evaluated in an IANA time
//! zone (UTC when none is named). One parser for the API server's
//! admission and the CronJob controller.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;

/// A parsed schedule in its time zone.
#[derive(Clone, Debug)]
pub struct Schedule {
    cron: Cron,
    tz: Tz,
}

/// Parse a cron line: five fields (minute hour day-of-month month
/// day-of-week) or a descriptor (`@yearly`, `@monthly`, `@weekly`,
/// `@daily`, `@hourly`). The error is the reason, for a field error.
pub fn parse_cron(schedule: &str) -> Result<Cron, String> {
    if schedule.contains("TZ") {
        return Err("cannot use TZ or CRON_TZ in schedule, use timeZone field instead".into());
    }
    let fields = schedule.split_whitespace().count();
    if !schedule.trim_start().starts_with('@') && fields != 5 {
        return Err(format!(
            "expected exactly 5 fields, found {fields}: {schedule:?}"
        ));
    }
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(schedule)
        .map_err(|e| e.to_string())
}

/// An IANA time zone name, as Go's `time.LoadLocation` accepts it for a
/// CronJob (never `Local`).
pub fn parse_time_zone(name: &str) -> Result<Tz, String> {
    if name.is_empty() {
        return Err("timeZone must be nil or non-empty string".into());
    }
    if name.eq_ignore_ascii_case("local") {
        return Err(
            "timeZone must be an explicit time zone as defined in https://www.iana.org/time-zones"
                .into(),
        );
    }
    Tz::from_str(name).map_err(|_| format!("unknown time zone {name}"))
}

impl Schedule {
    pub fn parse(schedule: &str, time_zone: Option<&str>) -> Result<Schedule, String> {
        let tz = match time_zone {
            Some(name) => parse_time_zone(name)?,
            None => Tz::UTC,
        };
        Ok(Schedule {
            cron: parse_cron(schedule)?,
            tz,
        })
    }

    pub fn time_zone(&self) -> Tz {
        self.tz
    }

    /// The first scheduled time after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|n| n.with_timezone(&Utc))
    }

    /// The last scheduled time at or before `t`.
    pub fn latest_until(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&t.with_timezone(&self.tz), true)
            .ok()
            .map(|n| n.with_timezone(&Utc))
    }

    /// How many scheduled times fall in `(after, until]`, counting at most
    /// `cap`.
    pub fn count_between(&self, after: DateTime<Utc>, until: DateTime<Utc>, cap: usize) -> usize {
        let mut n = 0;
        let mut t = after;
        while n < cap {
            match self.next_after(t) {
                Some(next) if next <= until => {
                    n += 1;
                    t = next;
                }
                _ => break,
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn standard_lines_and_descriptors_parse() {
        for ok in [
            "*/1 * * * *",
            "0 3 * * 1-5",
            "@hourly",
            "@daily",
            "15 2 1 JAN *",
        ] {
            assert!(parse_cron(ok).is_ok(), "{ok}");
        }
        for bad in ["", "* * * *", "0 * * * * *", "61 * * * *", "not a schedule"] {
            assert!(parse_cron(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_cron("CRON_TZ=UTC * * * * *").unwrap_err(),
            "cannot use TZ or CRON_TZ in schedule, use timeZone field instead"
        );
    }

    #[test]
    fn time_zones_come_from_the_tz_database() {
        assert!(parse_time_zone("Europe/Paris").is_ok());
        assert_eq!(
            parse_time_zone("Mars/Olympus").unwrap_err(),
            "unknown time zone Mars/Olympus"
        );
        assert!(parse_time_zone("Local").is_err());
        assert!(parse_time_zone("").is_err());
    }

    #[test]
    fn times_are_found_in_the_schedule_zone() {
        let s = Schedule::parse("0 9 * * *", Some("Europe/Paris")).unwrap();
        // 09:00 in Paris is 08:00 UTC in winter.
        let next = s.next_after(at("2026-01-10T07:00:00Z")).unwrap();
        assert_eq!(next, at("2026-01-10T08:00:00Z"));
        let every = Schedule::parse("*/1 * * * *", None).unwrap();
        assert_eq!(
            every.latest_until(at("2026-01-10T07:00:30Z")),
            Some(at("2026-01-10T07:00:00Z"))
        );
        assert_eq!(
            every.latest_until(at("2026-01-10T07:00:00Z")),
            Some(at("2026-01-10T07:00:00Z"))
        );
        assert_eq!(
            every.count_between(at("2026-01-10T07:00:00Z"), at("2026-01-10T07:05:00Z"), 100),
            5
        );
        assert_eq!(
            every.count_between(at("2026-01-10T07:00:00Z"), at("2026-01-11T07:05:00Z"), 100),
            100
        );
    }
}
