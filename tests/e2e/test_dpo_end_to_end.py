"""DPO through the services (policy + reference only) raises the hidden gold score."""

import asyncio
import json

from controller.clients import ServiceClients
from controller.config import ControllerConfig
from controller.service import run_controller
from demo.run import greedy_gold
from services.launcher import LocalMesh
from tests.support.data import write_pairs
from training import synthetic


def test_dpo_on_synthetic_preferences_raises_gold(sft_dir, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", synthetic.preference_pairs(600, seed=5))
    heldout = synthetic.heldout_prompts(48, seed=0)
    configs = {role: {"model": {"path": str(sft_dir)}, "server": {"num_threads": 1, "checkpoint_dir": str(tmp_path / role)}}
               for role in ("policy", "reference")}
    configs["policy"]["training"] = {"learning_rate": 5e-4, "micro_batch_size": 32}
    with LocalMesh(tmp_path / "services", configs) as mesh:
        async def run():
            await mesh.wait_ready(300)
            clients = ServiceClients(mesh.endpoints)
            before = await greedy_gold(clients, heldout, 24)
            cfg = ControllerConfig.model_validate({
                "algorithm": "dpo", "run_id": "dpo-e2e", "services": mesh.endpoints,
                "data": {"pairs": str(pairs)}, "server": {"host": "127.0.0.1", "port": 0},
                "output_dir": str(tmp_path / "run"), "save_checkpoint": None,
                "dpo": {"total_steps": 30, "batch_size": 16, "beta": 0.1},
            })
            runner = await run_controller(cfg)
            after = await greedy_gold(clients, heldout, 24)
            await clients.close()
            return before, after, runner.last_stats

        before, after, stats = asyncio.run(run())
        mesh.check_alive()
    lines = [json.loads(x) for x in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert len(lines) == 30 and lines[-1]["policy/version"] == 30
    assert stats["dpo/reward_accuracy"] > 0.5
    assert after > before + 0.05, (before, after)
