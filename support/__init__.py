"""What a training run needs besides the method, one idea per module.

cli          flags: the published recipes, --help, checks before anything loads
data         problems and gold answers, prompt lengths, the held-out split, the data order
equivalence  when a model's answer equals the gold one (grader.py finds the answer)
models       model directories: loading, checking and saving them
demo         the offline CPU demo: its toy task and tiny model
rundir       the run directory: its lock, args.json, metrics.jsonl and samples.jsonl
checkpoints  saving, finding and resuming from checkpoints
signals      SIGINT, SIGTERM and SIGHUP: finish the step, save, exit
dashboards   --report-to: TensorBoard or Weights & Biases, live
distributed  several processes under torchrun: ranks, sums and gathers; --fsdp sharding
"""
