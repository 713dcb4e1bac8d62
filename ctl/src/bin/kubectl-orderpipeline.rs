//! `kubectl orderpipeline`: orderctl's status, audit and dead-letter commands for
//! one pipeline, named as kubectl names things (see `orderpipeline_ctl::plugin`).

fn main() -> std::process::ExitCode {
    orderpipeline_ctl::plugin::main()
}
