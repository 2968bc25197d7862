//! The web dashboard, served by `warpline serve` at `/` and by local mode with `--ui ADDR`.

pub mod html;
