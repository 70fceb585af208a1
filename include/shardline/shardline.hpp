// shardline/shardline.hpp: the whole core library. The verbs transport has its own
// umbrella, <shardline/verbs.hpp>, behind the optional shardline::verbs target; the CUDA part
// lives under <shardline/cuda/>, behind shardline::cuda.
#pragma once

#include <shardline/error.hpp>
#include <shardline/memory.hpp>
#include <shardline/staging.hpp>
#include <shardline/trace.hpp>

#include <shardline/async/inflight_limiter.hpp>
#include <shardline/async/shard_barrier.hpp>
#include <shardline/async/use_frameless_awaitable.hpp>

#include <shardline/plan/convert.hpp>
#include <shardline/plan/parameter.hpp>
#include <shardline/plan/shard_map.hpp>
#include <shardline/plan/transfer_plan.hpp>

#include <shardline/transport/concepts.hpp>
#include <shardline/transport/loopback.hpp>
#include <shardline/transport/shm/transport.hpp>

#include <shardline/pipeline.hpp>
#include <shardline/weights_receiver.hpp>
