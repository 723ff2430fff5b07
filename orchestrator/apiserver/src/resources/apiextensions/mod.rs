//! apiextensions.k8s.io/v1: CustomResourceDefinitions, the custom
//! resources they define, and the controller that serves them.

pub mod controller;
pub mod custom;
pub mod customresourcedefinition;

#[cfg(test)]
mod tests;
