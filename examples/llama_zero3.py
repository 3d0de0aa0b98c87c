# Run: torchrun --standalone --nproc-per-node 2 examples/llama_zero3.py
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from parallel.wrap import wrap

gpu = torch.cuda.is_available()
dist.init_process_group("nccl" if gpu else "gloo")
rank, precision = dist.get_rank(), "bf16" if gpu else "fp32"
device = torch.device("cuda", rank % torch.cuda.device_count()) if gpu else torch.device("cpu")
torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
)
model = LlamaForCausalLM(config).to(device)
# Each decoder layer is a unit, whole only while it runs; the model itself holds the other parameters.
dp = wrap(model, zero=3, units=[LlamaDecoderLayer, model], lr=3e-3, max_grad_norm=1.0, precision=precision)

accumulate, rows, seq = 2, 4, 32  # micro-batches per step; rows and tokens per micro-batch and rank
data = torch.Generator().manual_seed(rank)  # every rank draws its own rows
for step in range(8):
    for i in range(accumulate):
        start = torch.randint(0, config.vocab_size, (rows, 1), generator=data)
        tokens = ((start + torch.arange(seq + 1)) % config.vocab_size).to(device)  # learnable: counting
        with dp.no_sync(i < accumulate - 1):  # communicate in the step's last backward only
            logits = dp(input_ids=tokens[:, :-1], use_cache=False).logits.float()  # the loss in fp32
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) / accumulate
            dp.scale(loss).backward()
    result = dp.step()  # average over ranks, clip, AdamW
    if rank == 0:
        print(f"step {step} loss {loss.item() * accumulate:.4f} grad norm {result.grad_norm:.4f}")

state = dp.state_dict()  # collective; canonical: loads at any number of ranks, or into LlamaForCausalLM
if rank == 0:
    torch.save(state, "llama_zero3.pt")
dist.destroy_process_group()
