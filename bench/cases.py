"""The issue's big cells, one definition for every benchmark that runs them.

A 6-layer TransformerEncoder(256, 4, 512) on randn(8, 32, 256) with
`.pow(2).mean().backward()`, and an LSTMCell(16, 32) unrolled 50 steps with
`h.sum().backward()`: each a setup cell run plainly, then the measured cell.
"""

TRANSFORMER_SETUP = """\
import torch, warnings
warnings.filterwarnings("ignore")  # TransformerEncoder's note on nested tensors, once per process
torch.manual_seed(0)
m = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(256, 4, 512, batch_first=True), 6)
inp = torch.randn(8, 32, 256)"""
TRANSFORMER = "m(inp).pow(2).mean().backward()"
# the same with the loss named, as the memory and size cells have it (the snapshot shows `loss`)
TRANSFORMER_NAMED = "loss = m(inp).pow(2).mean()\nloss.backward()"

LSTM_SETUP = """\
import torch
torch.manual_seed(0)
cell = torch.nn.LSTMCell(16, 32)
xs = torch.randn(50, 4, 16)"""
LSTM = """\
h = torch.zeros(4, 32)
c = torch.zeros(4, 32)
for t in range(50):
    h, c = cell(xs[t], (h, c))
h.sum().backward()"""

#: name -> (setup, cell), for the snapshot-size benchmark
MODELS = {"transformer": (TRANSFORMER_SETUP, TRANSFORMER_NAMED), "lstm": (LSTM_SETUP, LSTM)}
