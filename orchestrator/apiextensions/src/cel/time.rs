//! Timestamps and durations: parsing, printing, arithmetic and getters, as
//! CEL in Kubernetes (Go's `time`) has them.

use chrono::{DateTime, Datelike, FixedOffset, Offset, TimeDelta, Timelike, Utc};

use super::cost::{error, Fault};
use super::value::Value;

const NANOS_PER_SECOND: i64 = 1_000_000_000;

/// Go's `time.ParseDuration`, as CEL's `duration()` reads: an optional
/// sign, then numbers (with optional fractions) each followed by a unit
/// among `ns`, `us` (`µs`), `ms`, `s`, `m`, `h`; `0` alone. The result is
/// in nanoseconds and must fit in 64 bits.
pub(super) fn parse_duration(text: &str) -> Result<i64, &'static str> {
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err("empty");
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let whole_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (whole, after) = rest.split_at(whole_len);
        let (fraction, after) = match after.strip_prefix('.') {
            Some(after) => after.split_at(after.bytes().take_while(u8::is_ascii_digit).count()),
            None => ("", after),
        };
        if whole.is_empty() && fraction.is_empty() {
            return Err("expected a number");
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err("missing unit"),
            _ => return Err("unknown unit"),
        };
        // More digits than 2^63 ns has are out of range anyway.
        if whole.len() > 20 {
            return Err("out of range");
        }
        let whole: u128 = whole.parse().unwrap_or(0);
        // Nanoseconds need at most 18 fraction digits; more are dropped.
        let fraction = &fraction[..fraction.len().min(18)];
        let scale = 10u128.pow(fraction.len() as u32);
        let fraction: u128 = fraction.parse().unwrap_or(0);
        total += whole * unit + fraction * unit / scale;
        if total > 1 << 63 {
            return Err("out of range");
        }
        rest = after;
    }
    let total = total as i128;
    i64::try_from(if negative { -total } else { total }).map_err(|_| "out of range")
}

/// Seconds with a fraction as needed and an `s`, as CEL's
/// `string(duration)`: `5400s`, `1.5s`.
pub(super) fn format_duration(nanos: i64) -> String {
    let sign = if nanos < 0 { "-" } else { "" };
    let nanos = nanos.unsigned_abs();
    let (seconds, fraction) = (nanos / 1_000_000_000, nanos % 1_000_000_000);
    if fraction == 0 {
        format!("{sign}{seconds}s")
    } else {
        let fraction = format!("{fraction:09}");
        format!("{sign}{seconds}.{}s", fraction.trim_end_matches('0'))
    }
}

/// RFC 3339 in UTC with the fraction's trailing zeros dropped, as Go's
/// `time.RFC3339Nano`.
pub(super) fn format_timestamp(time: &DateTime<Utc>) -> String {
    let mut text = time.format("%Y-%m-%dT%H:%M:%S").to_string();
    let nanos = time.nanosecond() % 1_000_000_000;
    if nanos > 0 {
        let fraction = format!("{nanos:09}");
        text.push('.');
        text.push_str(fraction.trim_end_matches('0'));
    }
    text.push('Z');
    text
}

/// A timestamp, if within CEL's range (years 1 to 9999).
pub(super) fn timestamp<'a>(time: Option<DateTime<Utc>>) -> Result<Value<'a>, Fault> {
    match time {
        Some(time) if (1..=9999).contains(&time.year()) => Ok(Value::Timestamp(time)),
        _ => error("timestamp out of range"),
    }
}

pub(super) fn parse_timestamp<'a>(text: &str) -> Result<Value<'a>, Fault> {
    match DateTime::parse_from_rfc3339(text) {
        Ok(time) => timestamp(Some(time.to_utc())),
        Err(e) => error(format!("invalid timestamp {text:?}: {e}")),
    }
}

pub(super) fn from_unix_seconds<'a>(seconds: i64) -> Result<Value<'a>, Fault> {
    timestamp(DateTime::from_timestamp(seconds, 0))
}

pub(super) fn add(time: &DateTime<Utc>, nanos: i64) -> Result<Value<'static>, Fault> {
    timestamp(time.checked_add_signed(TimeDelta::nanoseconds(nanos)))
}

/// `a - b` in nanoseconds.
pub(super) fn between<'a>(a: &DateTime<Utc>, b: &DateTime<Utc>) -> Result<Value<'a>, Fault> {
    match (*a - *b).num_nanoseconds() {
        Some(nanos) => Ok(Value::Duration(nanos)),
        None => error("duration out of range"),
    }
}

/// `UTC` or a `±HH:MM` offset; named zones need a time zone database this
/// engine does not carry.
fn time_zone(zone: &str) -> Result<FixedOffset, Fault> {
    if zone.is_empty() || zone == "UTC" {
        return Ok(Utc.fix());
    }
    let unsupported = || {
        Fault::Error(format!(
            "time zone {zone:?} is not supported: use UTC or an offset such as '+01:00'"
        ))
    };
    let (hours, minutes) = zone.split_once(':').ok_or_else(unsupported)?;
    let hours: i32 = hours.parse().map_err(|_| unsupported())?;
    let minutes: i32 = minutes.parse().map_err(|_| unsupported())?;
    if !(0..=59).contains(&minutes) || !(-23..=23).contains(&hours) {
        return Err(unsupported());
    }
    let offset = if zone.starts_with('-') {
        hours * 60 - minutes
    } else {
        hours * 60 + minutes
    };
    FixedOffset::east_opt(offset * 60).ok_or_else(unsupported)
}

/// The getters of timestamps (in an optional time zone) and durations.
#[derive(Clone, Copy, Debug)]
pub(super) enum Part {
    FullYear,
    Month,
    DayOfYear,
    DayOfMonth,
    Date,
    DayOfWeek,
    Hours,
    Minutes,
    Seconds,
    Milliseconds,
}

pub(super) fn get<'a>(part: Part, args: &[Value<'a>]) -> Result<Value<'a>, Fault> {
    match args {
        [Value::Timestamp(time), zone @ ..] => {
            let zone = match zone {
                [] => time_zone("")?,
                [Value::String(zone)] => time_zone(zone)?,
                [other] => {
                    return error(format!("no such overload: time zone {}", other.type_name()))
                }
                _ => return error("no such overload"),
            };
            let t = time.with_timezone(&zone);
            Ok(Value::Int(match part {
                Part::FullYear => t.year().into(),
                Part::Month => t.month0().into(),
                Part::DayOfYear => t.ordinal0().into(),
                Part::DayOfMonth => t.day0().into(),
                Part::Date => t.day().into(),
                Part::DayOfWeek => t.weekday().num_days_from_sunday().into(),
                Part::Hours => t.hour().into(),
                Part::Minutes => t.minute().into(),
                Part::Seconds => t.second().into(),
                // A leap second's nanoseconds run past 10^9.
                Part::Milliseconds => (t.nanosecond() % 1_000_000_000 / 1_000_000).into(),
            }))
        }
        [Value::Duration(nanos)] => {
            let per = match part {
                Part::Hours => 3600 * NANOS_PER_SECOND,
                Part::Minutes => 60 * NANOS_PER_SECOND,
                Part::Seconds => NANOS_PER_SECOND,
                Part::Milliseconds => 1_000_000,
                _ => return error("no such overload for google.protobuf.Duration"),
            };
            Ok(Value::Int(nanos / per))
        }
        [other, ..] => error(format!("no such overload for {}", other.type_name())),
        [] => error("no such overload"),
    }
}
