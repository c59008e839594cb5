"""``shardserve bench``: load any OpenAI-compatible server over HTTP and measure what its users see.

- datasets.py: the request sets (a chat mix shipped here, fixed lengths, random tokens, a shared prefix);
- client.py: one streamed request, timed (TTFT, the gaps between tokens, end to end);
- runner.py: fixed-concurrency sweeps and Poisson arrival rates, bounded in requests and time,
  and their statistics;
- plots.py: throughput against concurrency, TTFT and ITL against throughput, one line per server;
- peers.py: vLLM's CPU build and llama.cpp's server installed beside us, each serving the same
  weights, swept one after another with shardserve (``shardserve bench peers``).
"""
