//! The `ffpush` command: parse, then hand over to [`ffpush::cli`].

fn main() {
    std::process::exit(ffpush::cli::main());
}
