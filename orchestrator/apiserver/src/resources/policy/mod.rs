//! policy/v1: PodDisruptionBudgets (the Eviction kind is pods/eviction).

pub mod poddisruptionbudget;
