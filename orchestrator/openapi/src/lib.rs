//! OpenAPI documents for the served resources.
