"""A worker-process setup hook for tests: a checkpoint whose name contains "poison" kills the Ray worker that
loads it, and training the zoo model of seed 13 (alone or in a lockstep chunk) kills its worker, every time (as a checkpoint too large for the
worker's memory would). Only the test's own Ray,
started with ``runtime_env={"worker_process_setup_hook": "tests.poison.install"}``, runs it."""
import os


def install() -> None:
    import dwf_ray.canon.job as job
    load = job.load_model_state

    def load_or_die(uri, arch=None):
        if "poison" in uri:
            os._exit(17)
        return load(uri, arch)
    job.load_model_state = load_or_die

    import dwf_ray.zoo as zoo
    train = zoo.train_classifier

    def train_or_die(model, cfg, seed):
        if seed == 13:
            os._exit(17)
        return train(model, cfg, seed)
    zoo.train_classifier = train_or_die

    lockstep = zoo.train_lockstep

    def lockstep_or_die(arch, cfg, seeds, data, init=None):
        if 13 in seeds:
            os._exit(17)
        return lockstep(arch, cfg, seeds, data, init)
    zoo.train_lockstep = lockstep_or_die
