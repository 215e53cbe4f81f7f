# The before/after tables of results/serving/api-hot-path-cpu (ab.md, ab.json in each folder).
#   bash results/serving/api-hot-path-cpu/tables.sh
set -e
R=results/serving/api-hot-path-cpu
python lab/tree_ab.py $R/asgi-cost --title "The ASGI app in-process, no sockets (lab/asgi_cost.py)" \
  --figure "µs a request (one token)=results.json:us_per_request.median" \
  --figure "µs a further chunk=results.json:us_per_chunk.median"
S="results.json:summary.u256-a5.ratios" P="results.json:rounds.0.points"
python lab/tree_ab.py $R/ttft-pairs \
  --title "HTTP against engine-direct, closed loop, no model (lab/http_ttft_cpu.py, 256 streams, 25-ms steps)" \
  --figure "HTTP ÷ direct, TTFT p50, 5 adapters=$S.http_over_direct_ttft_p50_adapters.median" \
  --figure "HTTP ÷ direct, TTFT p50, base=$S.http_over_direct_ttft_p50_base.median" \
  --figure "server's TTFT ÷ direct, p50, 5 adapters=$S.http_server_over_direct_ttft_p50_adapters.median" \
  --figure "server's TTFT ÷ direct, p50, base=$S.http_server_over_direct_ttft_p50_base.median" \
  --figure "HTTP ÷ direct, tok/s, 5 adapters=$S.http_over_direct_tok_s_adapters.median" \
  --figure "HTTP adapters: send to arrival p50 ms=$P.http-adapters.to_server_p50*1000" \
  --figure "HTTP adapters: loop lag p99 ms=$P.http-adapters.loop_lag_p99*1000" \
  --figure "HTTP adapters: serving process cores=$P.http-adapters.server_cpu_cores" \
  --figure "HTTP base: serving process cores=$P.http-base.server_cpu_cores"
W="results.json:rounds.0.points"
python lab/tree_ab.py $R/waves-in-step \
  --title "k6's waves through the API, no model (lab/http_ttft_cpu.py --waves, 100-token answers)" \
  --figure "think: client's TTFT p50 ms=$W.think.ttft_p50*1000" \
  --figure "think: TTFT p50, busiest ¼ of arrivals, ms=$W.think.ttft_p50_busiest_quarter*1000" \
  --figure "think: server's TTFT p50 ms=$W.think.server_ttft_p50*1000" \
  --figure "think: client's send to the server's arrival p50 ms=$W.think.to_server_p50*1000" \
  --figure "think: serving process cores=$W.think.server_cpu_cores" \
  --figure "think: arrivals per 100 ms, p99=$W.think.arrivals_per_100ms_p99" \
  --figure "closed: client's TTFT p50 ms=$W.closed.ttft_p50*1000" \
  --figure "closed: server's TTFT p50 ms=$W.closed.server_ttft_p50*1000" \
  --figure "closed: serving process cores=$W.closed.server_cpu_cores"
C="results.json:points"
python lab/tree_ab.py $R/http-ceiling \
  --title "The API's streamed-token ceiling, no model (loadtest.http_ceiling --target api, 256 streams)" \
  --figure "output tok/s, base=$C.u256-a0.output_throughput" \
  --figure "output tok/s, 1 adapter=$C.u256-a1.output_throughput" \
  --figure "serving process cores, base=$C.u256-a0.server_cpu_cores" \
  --figure "serving process cores, 1 adapter=$C.u256-a1.server_cpu_cores" \
  --figure "Locust cores, 1 adapter=$C.u256-a1.client_cpu_cores" \
  --figure "TTFT p50 ms, 1 adapter=$C.u256-a1.ttft_p50*1000"
