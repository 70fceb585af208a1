// shardline/verbs.hpp: the RDMA verbs transport (links libibverbs: shardline::verbs).
#pragma once

#include <shardline/transport/verbs/completion_queue.hpp>
#include <shardline/transport/verbs/device.hpp>
#include <shardline/transport/verbs/error.hpp>
#include <shardline/transport/verbs/memory_region.hpp>
#include <shardline/transport/verbs/memory_window.hpp>
#include <shardline/transport/verbs/options.hpp>
#include <shardline/transport/verbs/queue_pair.hpp>
#include <shardline/transport/verbs/transport.hpp>
