// shardline/shardline.hpp: the whole core library (verbs and CUDA parts have their own headers).
#pragma once

#include <shardline/error.hpp>
#include <shardline/loopback_transport.hpp>
#include <shardline/memory.hpp>
#include <shardline/transport.hpp>
