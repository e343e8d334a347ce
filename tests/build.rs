//! Marks the end-to-end tests that need root as ignored for an ordinary user's `cargo test`.

include!("build/root_cfg.rs");

fn main() {
    emit_root_cfg();
}
