//! Transitional: the old path of [`crate::lb`]'s table builders, kept so that `config` (being
//! moved to `agent-common` on another branch) compiles unchanged. Remove at that merge; new
//! code uses `crate::lb`.

pub use crate::lb::{NO_BACKEND, backend_key, maglev, weight, wrr};
