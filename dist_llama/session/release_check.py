"""The release check: a script, not imported by the session. The release stage copies it into an empty folder
and runs it with `python -S`, where dist_llama cannot be imported (stages._isolated_env):

    release_check.py REPORT RELEASE DEVICE PROMPTS_JSON GENERATION_JSON TOLERANCE

It loads the release folder RELEASE with trust_remote_code, and the same weights into stock LlamaForCausalLM
with a LlamaConfig of the release's config.json (its field names are Llama's), compares their logits on the
prompts, generates from each (greedy, and sampled with a seed) and writes the REPORT JSON; a problem is its
"problem" field, and exit status 1.
"""

import importlib.util
import json
import sys


def finish(report: dict, report_path: str, problem=None):
    report["problem"] = problem
    open(report_path, "w").write(json.dumps(report, indent=1))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(1)


# Keys of a release's config.json that are ours, not LlamaConfig's.
CUSTOM_CONFIG_KEYS = ("architectures", "auto_map", "model_type", "attention", "transformers_version")


def main(report_path, custom, device, prompts, generation, tolerance):
    prompts, generation, tolerance = json.loads(prompts), json.loads(generation), float(tolerance)
    report = {"dist_llama_importable": importlib.util.find_spec("dist_llama") is not None, "device": device}
    if report["dist_llama_importable"]:
        finish(
            report,
            report_path,
            "dist_llama is importable in the isolated process; "
            "the check would not prove the folder stands alone",
        )
    model, llama, tokenizer, loading = _load_release_and_stock_llama(custom, device)
    report.update(loading)
    if report["loading_info"] or report["stock_loading_info"]:
        finish(
            report,
            report_path,
            f"weights did not load cleanly: {report['loading_info'] or report['stock_loading_info']}",
        )
    worst, largest, report["generations"] = _compare_on_prompts(
        model, llama, tokenizer, prompts, generation, device
    )
    report.update(
        {
            "max_abs_logit_diff": worst,
            "max_abs_logit": largest,
            "relative_tolerance": tolerance,
            "sampling": generation,
        }
    )
    if worst > tolerance * max(1.0, largest):
        finish(
            report,
            report_path,
            f"logits differ from stock LlamaForCausalLM by {worst:.3g} "
            f"(> {tolerance:g} x max(1, {largest:.3g}))",
        )
    finish(report, report_path)


def _load_release_and_stock_llama(custom, device):
    """The release's own model (trust_remote_code), the same weights in stock LlamaForCausalLM, the tokenizer,
    and the report's fields on what was loaded (a non-empty loading_info is a weight that did not fit)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        custom, trust_remote_code=True, output_loading_info=True
    )
    fields = json.loads(open(f"{custom}/config.json").read())
    llama_config = LlamaConfig(
        **{key: value for key, value in fields.items() if key not in CUSTOM_CONFIG_KEYS}
    )
    llama, llama_info = LlamaForCausalLM.from_pretrained(
        custom, config=llama_config, output_loading_info=True
    )
    model, llama = model.to(device).eval(), llama.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(custom, trust_remote_code=True)
    loading = {
        "class": type(model).__name__,
        "module": type(model).__module__,
        "dtype": str(model.dtype),
        "loading_info": {k: sorted(map(str, v)) for k, v in info.items() if v},
        "stock_loading_info": {k: sorted(map(str, v)) for k, v in llama_info.items() if v},
    }
    return model, llama, tokenizer, loading


def _compare_on_prompts(model, llama, tokenizer, prompts, generation, device):
    """(largest absolute logit difference between the two models, largest absolute stock logit,
    each prompt's generations)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    worst, largest, generations = 0.0, 0.0, []
    with torch.no_grad():
        for prompt in prompts:
            inputs = tokenizer(prompt, return_tensors="pt").to(device)
            ours, theirs = model(**inputs).logits.float(), llama(**inputs).logits.float()
            worst = max(worst, (ours - theirs).abs().max().item())
            largest = max(largest, theirs.abs().max().item())
            generations.append(_generate(model, llama, tokenizer, prompt, inputs, generation, pad))
    return worst, largest, generations


def _generate(model, llama, tokenizer, prompt, inputs, generation, pad):
    """The release's greedy and seeded sampled continuations of a prompt, and whether stock Llama's
    greedy one is the same tokens."""
    import torch

    max_new_tokens = generation["max_new_tokens"]
    greedy = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    stock_greedy = llama.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    torch.manual_seed(generation["seed"])
    sampled = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=generation["temperature"],
        top_p=generation["top_p"],
        pad_token_id=pad,
    )
    return {
        "prompt": prompt,
        "greedy": tokenizer.decode(greedy[0], skip_special_tokens=True),
        "sampled": tokenizer.decode(sampled[0], skip_special_tokens=True),
        "greedy_equals_stock_llama": torch.equal(greedy, stock_greedy),
    }


if __name__ == "__main__":
    main(*sys.argv[1:7])
