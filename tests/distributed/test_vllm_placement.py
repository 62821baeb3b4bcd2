"""The loop's vLLM path on the CPU: engines of `tp` rollout ranks, prompts split per engine, weights through a
StatelessGroup that the engine's workers join. vLLM itself cannot run here, so a STAND-IN engine plays it: it has
VLLMEngine's side of the Engine interface (generate, connect to a group of its own, receive_weights, sleep, wake),
its `tp` "workers" are threads that each join the sync group as vLLM's worker processes do, and it generates with
the native engine. It is passed to the loop as its engine factory. The same run with the native engine must give
the same metrics."""

import json
import threading

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import grpo.loop
from grpo.config import apply_overrides
from grpo.weight_sync import StatelessGroup, WeightReceiver
from hpc.presets import get_preset

class StandInVLLM:
    def __init__(self, cfg, roles, device):
        cfg.rollout.engine = "native"
        self.native = grpo.loop.make_engine(cfg, roles, device).engine  # the generation side
        cfg.rollout.engine = "vllm"
        self.tp, self.workers = roles.tp, []
        self.sleeps = 0

    def generate(self, prompts, n, seed):
        return self.native.generate(prompts, n, seed)

    def sleep(self):
        self.sleeps += 1

    def wake(self, tags=("weights", "kv_cache")):
        pass

    def memory_stats(self):
        return {}

    def connect(self, link):
        def join(tp_rank):
            group = StatelessGroup(host=link.host, port=link.port, rank=link.rank_offset + tp_rank,
                                   world_size=link.world_size, backend=link.backend)
            self.workers.append((tp_rank, WeightReceiver(link.specs, group, src=0, bucket_bytes=link.bucket_bytes,
                                                         device=torch.device("cpu"))))
        threads = [threading.Thread(target=join, args=(i,)) for i in range(self.tp)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def receive_weights(self):
        counts = {}

        def receive(tp_rank, receiver):
            if tp_rank == 0:  # worker 0 loads into the engine's model; the others receive the same bytes
                counts[tp_rank] = self.native.load_weights(receiver.receive())
            else:
                counts[tp_rank] = sum(1 for _ in receiver.receive())
        threads = [threading.Thread(target=receive, args=w) for w in self.workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(counts.values())) == 1, counts
        return counts[0]


def worker(rank, init_file, run_dir, engine, rollouts, tp, world):
    import grpo.loop as loop

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = apply_overrides(get_preset("local"), ["train.steps=3", "train.export_hf=false",
                                                    f"rollout.engine={engine}"])
        loop.run(cfg, loop.Roles(trainers=[0], rollouts=rollouts, device="cpu", tp=tp), run_dir,
                 make_engine=StandInVLLM if engine == "vllm" else None)
    finally:
        dist.destroy_process_group()


def metrics(run_dir):
    keys = ("reward", "pg_loss", "kl", "entropy", "grad_norm", "response_len")
    return [[json.loads(line)[k] for k in keys] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run(tmp_path, name, engine, rollouts, tp):
    run_dir = tmp_path / name
    run_dir.mkdir()
    world = 1 + len(rollouts)
    mp.spawn(worker, args=(str(tmp_path / f"{name}.init"), str(run_dir), engine, rollouts, tp, world), nprocs=world,
             join=True)
    return metrics(run_dir)


def test_one_engine_of_two_ranks_matches_one_native_engine(tmp_path):
    assert run(tmp_path, "vllm-tp2", "vllm", [1, 2], 2) == run(tmp_path, "native", "native", [1], 1)


def test_two_engines_split_the_prompts_like_two_native_ranks(tmp_path):
    assert run(tmp_path, "vllm-2x1", "vllm", [1, 2], 1) == run(tmp_path, "native-2", "native", [1, 2], 1)
