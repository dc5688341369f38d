"""Load a Hugging Face export of fsdp_train.py with plain transformers and continue a prompt.

python examples/generate.py outputs/demo/hf "The lighthouse keeper" [--max-new-tokens 40]
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="folder written by fsdp_train.py (SAVE_DIR/EXP/hf) or `fsdp_train.py export`")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=40)
    args = p.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=True, top_k=20, temperature=0.8)
    print(tokenizer.decode(out[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
