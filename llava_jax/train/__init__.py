"""Training: the library call `loop.train(config, workdir)`, what a config builds (build), the
processes of a job and their host-to-host agreement (hosts), optimizer and freezing (optim), the
jitted step (trainer), the run's Orbax checkpoints (run_checkpoints), metrics sinks (metrics), and the
`llava-jax train` command line (main)."""
