//! What evaluation may spend, in Kubernetes' cost units.
//!
//! A [`Budget`] belongs to one request and is shared by every rule it
//! evaluates; a [`Meter`] counts one evaluation against it and against the
//! per-call limit, and is charged as evaluation proceeds, so that a rule
//! stops as soon as it has spent what it may (nothing is estimated up
//! front, and work is paid for before it is done where its size is known).
//!
//! One unit is one expression node evaluated, or one element a macro,
//! comparison or list function visits. Bytes cost a unit each when built
//! or searched by a regular expression, and a unit per 16 when scanned;
//! compiling a pattern at run time costs what its worst case takes. In a
//! release build 10^6 units take about 16 to 18 ms when nodes dominate,
//! and less when bytes or patterns do (`tests::cost_calibration`), so the
//! whole request budget is spent in under 0.2 s.

use std::collections::HashMap;
use std::sync::Arc;

use regex::Regex;

/// Most one evaluation may cost (Kubernetes' `PerCallLimit`).
pub const CALL_LIMIT: u64 = 1_000_000;

/// Most the rules of one request may cost together (Kubernetes'
/// `RuntimeCELCostBudget`).
pub const REQUEST_BUDGET: u64 = 10_000_000;

/// Bytes read per unit by work that scans (compares, searches, counts):
/// such work runs at memory speed, tens of times faster per byte than a node.
const SCAN_BYTES_PER_UNIT: u64 = 16;

/// Compiling a pattern with the small size limit, measured at up to 0.4 ms
/// in a release build...
const SMALL_PATTERN_COST: u64 = 20_000;
/// ...plus parsing it, measured at up to 0.6 µs per byte.
const PATTERN_BYTE_COST: u64 = 64;
/// Compiling one that needs the large limit, measured at up to 14 ms.
const LARGE_PATTERN_COST: u64 = 400_000;
/// Most compiled size a pattern gets before it pays for the large limit.
const SMALL_PATTERN_LIMIT: usize = 64 << 10;
/// Most compiled size of any pattern.
pub(super) const PATTERN_SIZE_LIMIT: usize = 1 << 20;
/// Patterns a budget keeps compiled (each holds up to about a megabyte).
const CACHED_PATTERNS: usize = 16;

/// Why evaluation stopped before it had a result; Kubernetes runs no
/// further rules of the request after either.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The evaluation went over [`CALL_LIMIT`].
    CallLimit,
    /// The request's [`Budget`] is spent.
    Budget,
}

impl Stop {
    /// Kubernetes' wording.
    pub fn message(self) -> &'static str {
        match self {
            Stop::CallLimit => "operation cancelled: actual cost limit exceeded",
            Stop::Budget => "validation failed due to running out of cost budget, no further validation rules will be run",
        }
    }
}

/// The cost units one request may still spend on rules, and the patterns
/// its rules compiled at run time.
pub struct Budget {
    remaining: u64,
    patterns: HashMap<Box<str>, Arc<Regex>>,
}

impl Budget {
    /// Kubernetes' budget of [`REQUEST_BUDGET`] units.
    pub fn new() -> Self {
        Self::with_units(REQUEST_BUDGET)
    }

    pub fn with_units(units: u64) -> Self {
        Budget {
            remaining: units,
            patterns: HashMap::new(),
        }
    }

    pub fn remaining(&self) -> u64 {
        self.remaining
    }
}

impl Default for Budget {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

/// Why an expression has no value: a CEL error (which `&&`, `||` and the
/// macros may absorb) or a stop (which nothing absorbs).
#[derive(Debug)]
pub(super) enum Fault {
    Error(String),
    Stop(Stop),
}

impl From<Stop> for Fault {
    fn from(stop: Stop) -> Self {
        Fault::Stop(stop)
    }
}

/// A CEL error with `message`.
pub(super) fn error<T>(message: impl Into<String>) -> Result<T, Fault> {
    Err(Fault::Error(message.into()))
}

/// One evaluation's spending.
pub(super) struct Meter<'b> {
    budget: &'b mut Budget,
    used: u64,
    limit: u64,
}

impl<'b> Meter<'b> {
    pub(super) fn new(budget: &'b mut Budget) -> Self {
        let limit = CALL_LIMIT.min(budget.remaining);
        Meter {
            budget,
            used: 0,
            limit,
        }
    }

    #[inline]
    pub(super) fn charge(&mut self, units: u64) -> Result<(), Stop> {
        self.used = self.used.saturating_add(units);
        if self.used <= self.limit {
            Ok(())
        } else if self.limit < CALL_LIMIT {
            // What is left of the budget was the tighter limit.
            Err(Stop::Budget)
        } else {
            Err(Stop::CallLimit)
        }
    }

    /// Work that reads `bytes` (or visits that many small items) once.
    #[inline]
    pub(super) fn scan(&mut self, bytes: usize) -> Result<(), Stop> {
        self.charge(bytes as u64 / SCAN_BYTES_PER_UNIT + 1)
    }

    /// Work that builds `bytes`, or handles that many bytes one at a time
    /// (a regular expression's search).
    #[inline]
    pub(super) fn build(&mut self, bytes: usize) -> Result<(), Stop> {
        self.charge(bytes as u64 + 1)
    }

    /// The regular expression `pattern`, compiled once per budget.
    pub(super) fn pattern(&mut self, pattern: &str) -> Result<Arc<Regex>, Fault> {
        self.scan(pattern.len())?;
        if let Some(regex) = self.budget.patterns.get(pattern) {
            return Ok(Arc::clone(regex));
        }
        self.charge(SMALL_PATTERN_COST.saturating_add(pattern.len() as u64 * PATTERN_BYTE_COST))?;
        let regex = match compile_pattern(pattern, SMALL_PATTERN_LIMIT) {
            Err(regex::Error::CompiledTooBig(_)) => {
                self.charge(LARGE_PATTERN_COST)?;
                compile_pattern(pattern, PATTERN_SIZE_LIMIT)
            }
            other => other,
        };
        let regex = Arc::new(regex.map_err(|e| Fault::Error(describe_pattern_error(pattern, &e)))?);
        if self.budget.patterns.len() < CACHED_PATTERNS {
            self.budget
                .patterns
                .insert(pattern.into(), Arc::clone(&regex));
        }
        Ok(regex)
    }

    /// Take what was spent from the budget.
    pub(super) fn finish(self) {
        self.budget.remaining = self.budget.remaining.saturating_sub(self.used);
    }
}

pub(super) fn compile_pattern(pattern: &str, size_limit: usize) -> Result<Regex, regex::Error> {
    regex::RegexBuilder::new(pattern)
        .size_limit(size_limit)
        .dfa_size_limit(size_limit)
        .build()
}

pub(super) fn describe_pattern_error(pattern: &str, error: &regex::Error) -> String {
    // The last line of a syntax error says what is wrong; the others draw
    // the pattern.
    let error = error.to_string();
    let reason = error.lines().last().unwrap_or_default().trim();
    let pattern = super::functions::truncated(pattern);
    format!("invalid regular expression {pattern:?}: {reason}")
}
