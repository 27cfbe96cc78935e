//! placeholder
pub mod catalog;
mod error;
pub mod format;
pub use error::StoreError;
