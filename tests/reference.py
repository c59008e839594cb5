"""Reference outputs from unsharded `transformers`, and a driver that runs prompts through an engine."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch

from cluster.protocol import GenerateRequest
from model.sampling import SamplingParams


@dataclass
class Generated:
    token_ids: list[int]
    logprobs: list[float]  # the chosen token's logprob at each step (when asked for)
    finish_reason: str | None
    text: str


def hf_greedy(model_dir, prompts: list[list[int]], max_new_tokens: int) -> list[Generated]:
    """transformers generate(do_sample=False), one prompt at a time, EOS disabled (engines use ignore_eos)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None
    results = []
    for ids in prompts:
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        new = out.sequences[0, len(ids) :].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, new)]
        results.append(Generated(new, logprobs, "length", ""))
    return results


async def collect(engine, prompt_ids: list[int], params: SamplingParams) -> Generated:
    tokens, logprobs, text, reason = [], [], "", None
    async for out in engine.generate(GenerateRequest(prompt_ids, params)):
        tokens += out.token_ids
        text += out.text
        if out.logprobs:
            logprobs += [lp.logprob for lp in out.logprobs]
        reason = out.finish_reason
    return Generated(tokens, logprobs, reason, text)


def run_all(engine, prompts: list[list[int]], params: SamplingParams) -> list[Generated]:
    """Submit every prompt at once (so they share batches) and wait for all."""

    async def main():
        return await asyncio.gather(*(collect(engine, p, params) for p in prompts))

    return asyncio.run(main())


def greedy(max_tokens: int, logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs)


def close(engine) -> None:
    asyncio.run(engine.shutdown())
