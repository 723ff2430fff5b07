//! The time controllers act on: the system's, or a manual one that tests
//! move, so time-driven behaviour (CronJob schedules) is tested without
//! waiting for it.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, Utc};
use tokio::sync::watch;

use tapestry_runtime::lock;

#[derive(Clone, Default)]
pub struct Clock(Option<Arc<Manual>>);

struct Manual {
    now: Mutex<DateTime<Utc>>,
    moved: watch::Sender<DateTime<Utc>>,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("Clock(system)"),
            Some(m) => write!(f, "Clock(manual at {})", lock(&m.now)),
        }
    }
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock(None)
    }

    /// A clock that stands at `start` until it is moved.
    pub fn manual(start: DateTime<Utc>) -> Clock {
        Clock(Some(Arc::new(Manual {
            now: Mutex::new(start),
            moved: watch::channel(start).0,
        })))
    }

    pub fn now(&self) -> DateTime<Utc> {
        match &self.0 {
            None => Utc::now(),
            Some(m) => *lock(&m.now),
        }
    }

    /// Move a manual clock by `by` (the system clock does not move).
    pub fn advance(&self, by: Duration) {
        if let Some(m) = &self.0 {
            let mut now = lock(&m.now);
            *now += by;
            m.moved.send_replace(*now);
        }
    }

    /// Each move of a manual clock; None for the system clock.
    pub fn moves(&self) -> Option<watch::Receiver<DateTime<Utc>>> {
        self.0.as_ref().map(|m| m.moved.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_stands_until_moved() {
        let start = DateTime::parse_from_rfc3339("2026-01-10T07:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let c = Clock::manual(start);
        let mut moves = c.moves().unwrap();
        assert_eq!(c.now(), start);
        c.advance(Duration::seconds(61));
        assert_eq!(c.now(), start + Duration::seconds(61));
        assert!(moves.has_changed().unwrap());
        assert_eq!(*moves.borrow_and_update(), c.now());
        assert!(Clock::system().moves().is_none());
    }
}
