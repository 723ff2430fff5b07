//! The filter stage: a libpcap-compiled program run by our evaluator.

use crate::bpf::{FilterError, Program};

pub struct Filter {
    expr: String,
    program: Program,
}

impl Filter {
    /// Compiles `expr`; libpcap's message comes back on error.
    pub fn new(expr: &str, linktype: u32) -> Result<Self, FilterError> {
        Ok(Filter {
            expr: expr.to_string(),
            program: Program::compile(expr, linktype, 262_144)?,
        })
    }

    #[inline]
    pub fn matches(&self, data: &[u8], wire_len: u32) -> bool {
        self.program.matches(data, wire_len)
    }

    pub fn expr(&self) -> &str {
        &self.expr
    }

    pub fn program(&self) -> &Program {
        &self.program
    }
}
