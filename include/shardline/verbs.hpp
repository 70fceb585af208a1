// shardline/verbs.hpp: the RDMA verbs transport (links libibverbs: shardline::verbs).
#pragma once

#include <shardline/verbs/completion_queue.hpp>
#include <shardline/verbs/device.hpp>
#include <shardline/verbs/error.hpp>
#include <shardline/verbs/memory_region.hpp>
#include <shardline/verbs/options.hpp>
#include <shardline/verbs/queue_pair.hpp>
#include <shardline/verbs/transport.hpp>
