//! trove-executor: placeholder until the executor issue lands (zygote, actors, workers).
#![deny(unsafe_op_in_unsafe_fn)]
