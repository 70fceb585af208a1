// shardline/shardline.hpp: the whole core library. The verbs transport has its own
// umbrella, <shardline/verbs.hpp>, behind the optional shardline::verbs target.
#pragma once

#include <shardline/convert.hpp>
#include <shardline/error.hpp>
#include <shardline/inflight_limiter.hpp>
#include <shardline/loopback_transport.hpp>
#include <shardline/memory.hpp>
#include <shardline/parameter.hpp>
#include <shardline/pipeline.hpp>
#include <shardline/shard_barrier.hpp>
#include <shardline/shard_map.hpp>
#include <shardline/shm_transport.hpp>
#include <shardline/trace.hpp>
#include <shardline/transfer_plan.hpp>
#include <shardline/transport.hpp>
#include <shardline/weights_receiver.hpp>
