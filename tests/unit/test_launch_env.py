"""Reading the job from the launcher's environment, and refusing launches the recipe cannot run."""

import json

import pytest

from flora_train.base.zero import ZeroSpec, check_zero_launch, deepspeed_config
from flora_train.launch_env import elastic_job, LaunchEnv, LaunchError, first_host, read_launch_env

TORCH = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}


@pytest.mark.parametrize(
    "extra, launcher",
    [
        ({"TORCHELASTIC_RUN_ID": "x", "GROUP_RANK": "1"}, "torchrun"),
        ({"CROSS_RANK": "0", "LOCAL_SIZE": "2"}, "deepspeed"),
        ({"ACCELERATE_MIXED_PRECISION": "no"}, "accelerate"),
        ({}, "env"),
    ],
)
def test_torch_environment_from_any_launcher(extra, launcher):
    env = read_launch_env({**TORCH, **extra})
    assert env == LaunchEnv(launcher, 3, 4, 1, "10.0.0.1", 29400, local_world_size=int(extra.get("LOCAL_SIZE", 1)))
    assert env.torch_environ() == TORCH


def test_srun_gives_the_same_five_values():
    slurm = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
             "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu[007-010],cpu1", "SLURM_NTASKS": "8"}
    env = read_launch_env(slurm)
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.master_addr) == ("srun", 5, 8, 1, "gpu007")
    assert env.master_port == read_launch_env({**slurm, "SLURM_PROCID": "0"}).master_port  # same for every task
    assert env.master_port != read_launch_env({**slurm, "SLURM_JOB_ID": "1235"}).master_port
    assert read_launch_env({**slurm, "MASTER_PORT": "4000"}).master_port == 4000
    # srun torchrun ...: torchrun's own variables win over Slurm's
    assert read_launch_env({**slurm, **TORCH}).rank == 3


def test_sbatch_script_without_srun_is_one_process():
    # The batch step sees the job's task count but is one process: it must not wait for peers.
    env = read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"})
    assert env == LaunchEnv("single")


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR, MASTER_PORT not set"),
        ({**TORCH, "RANK": "4"}, "RANK=4 is outside WORLD_SIZE=4"),
        ({**TORCH, "MASTER_PORT": "http"}, "MASTER_PORT='http' is not an integer"),
        ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}, "SLURM_STEP_NODELIST is not set"),
    ],
)
def test_broken_environments_are_named(env, message):
    with pytest.raises(LaunchError, match=message):
        read_launch_env(env)


FORMS = [("node1", "node1"), ("n[01-04]", "n01"), ("a[3,5-7],b2", "a3"), ("gpu[1-2]x[3-4]", "gpu1x3"),
         ("node[01-02]-ib", "node01-ib"), ("c-1-[9-12]x", "c-1-9x"), ("r[10-11]n[007-009],login", "r10n007")]


@pytest.mark.parametrize("nodes, host", FORMS)
def test_first_host_of_a_slurm_nodelist(nodes, host):
    """Before, suffixes were lost (``node[01-02]-ib`` -> ``node01``) and later brackets ignored."""
    assert first_host(nodes) == host


def test_first_host_agrees_with_scontrol(tmp_path):
    """The real ``scontrol show hostnames`` (Slurm is installed by `make test`) on every form this
    Slurm accepts gives the same first host."""
    import shutil
    import subprocess

    if shutil.which("scontrol") is None:
        pytest.fail("scontrol not found: `make test` installs Debian's slurm-wlm")
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\nPartitionName=p Nodes=ALL\n")
    checked = 0
    for nodes, host in FORMS:
        proc = subprocess.run(["scontrol", "show", "hostnames", nodes], env={"SLURM_CONF": str(conf)},
                              capture_output=True, text=True)
        if proc.stdout.strip():  # this Slurm (22.05) refuses text after a bracket (node[01-02]-ib), exit code 0
            assert proc.stdout.split()[0] == first_host(nodes) == host, nodes
            checked += 1
    assert checked >= 4


def test_a_broken_nodelist_is_named():
    with pytest.raises(LaunchError, match=r"cannot read the Slurm node list 'n\[01-'"):
        first_host("n[01-")


def test_accelerate_zero_stage_from_flags_and_config_file(tmp_path):
    flags = read_launch_env({**TORCH, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                             "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"})
    assert (flags.launcher_zero_stage, flags.launcher_offload_params) == (3, "cpu")
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    from_file = read_launch_env({**TORCH, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(cfg)})
    assert from_file.launcher_zero_stage == 2
    with pytest.raises(LaunchError, match="accelerate launch asked for DeepSpeed ZeRO stage 2 but the recipe has base.zero_stage=3"):
        check_zero_launch(ZeroSpec(3), from_file)
    with pytest.raises(LaunchError, match=r"ds\.json: cannot read it"):
        cfg.write_text("{not json")
        read_launch_env({**TORCH, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(cfg)})


def test_zero3_needs_more_than_one_process_or_offload():
    single = LaunchEnv("single")
    with pytest.raises(LaunchError, match="base.zero_stage=3 on a world of one process partitions nothing"):
        check_zero_launch(ZeroSpec(3), single)
    check_zero_launch(ZeroSpec(3, "cpu"), single)
    check_zero_launch(ZeroSpec(0), single)
    check_zero_launch(ZeroSpec(3), LaunchEnv("torchrun", 0, 2, 0, "127.0.0.1", 1))


def test_deepspeed_config_follows_the_base_and_takes_extras():
    cfg = deepspeed_config(ZeroSpec(3, "cpu", {"zero_optimization": {"stage3_prefetch_bucket_size": 7}}), "bfloat16")
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["zero_optimization"]["stage3_prefetch_bucket_size"] == 7
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["gradient_clipping"] == 0.0  # DeepSpeed 0.19 would clip at 1.0 otherwise


def test_a_torchrun_job_is_known_by_its_rendezvous_id_but_not_by_the_default_one():
    """A restarted round of the same torchrun job resumes its checkpoints; torchrun's default id
    ``none`` is every static-rendezvous job's, so it must not make a fresh job resume another's."""
    assert elastic_job({"TORCHELASTIC_RUN_ID": "slurm-1234"}) == "slurm-1234"
    assert elastic_job({"TORCHELASTIC_RUN_ID": "none"}) is None and elastic_job({}) is None


def test_run_by_hand_says_what_the_launch_section_asks_for_and_launched_ranks_do_not():
    """`flora-train run` on a recipe asking launch for two processes trained in one, without a word."""
    from flora_train.config import load_recipe
    from flora_train.train.run import launch_unread

    two = load_recipe("recipes/quickstart.yaml", ["launch.procs_per_node=2"])
    note = launch_unread(two, {})
    assert note is not None and "2 processes (1 node(s) x launch.procs_per_node=2)" in note
    assert "`flora-train launch RECIPE`" in note
    slurm = load_recipe("recipes/quickstart.yaml", ["launch.scheduler=slurm", "launch.nodes=2"])
    note = launch_unread(slurm, {})
    assert note is not None and "a slurm job of 2 processes" in note
    assert launch_unread(load_recipe("recipes/quickstart.yaml"), {}) is None  # one local process: nothing to say
    # Launched: torchrun (k8s pods and local launches, one process too), or a Slurm job (srun of one task too).
    one = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "x"}
    srun = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "1"}
    assert launch_unread(two, {**TORCH, "TORCHELASTIC_RUN_ID": "x"}) is None
    assert launch_unread(two, one) is None and launch_unread(slurm, srun) is None
