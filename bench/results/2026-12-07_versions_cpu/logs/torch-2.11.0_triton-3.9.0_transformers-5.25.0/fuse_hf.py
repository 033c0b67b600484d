# fuse_hf.py - run with: torchrun --nproc-per-node 2 fuse_hf.py
import torch
import torch.distributed as dist
import transformers
import arfuse

dist.init_process_group("gloo")
path = "/tmp/tiny-llama"
if dist.get_rank() == 0:  # a tiny Llama with random weights, saved locally: nothing is downloaded
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
dist.barrier()
model = transformers.AutoModelForCausalLM.from_pretrained(
    path, dtype=torch.float32, distributed_config=transformers.DistributedConfig(tp_size=2))  # HF's own TP

fused = arfuse.compile(model)  # the one line
ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
with torch.no_grad():
    logits = fused(input_ids=ids, use_cache=False).logits
    expected = model(input_ids=ids, use_cache=False).logits
print(f"rank {dist.get_rank()}: max |fused - eager| = {(logits - expected).abs().max():.1e}")
if dist.get_rank() == 0:
    print(arfuse.compile_report())  # every collective: fused into what, or left alone and why
    print(arfuse.stats())           # the fused calls that ran (4 = 2 per decoder layer)
dist.destroy_process_group()
