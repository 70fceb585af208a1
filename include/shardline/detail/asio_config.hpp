// How shardline needs Asio configured, checked before anything of Asio is compiled.
#pragma once

// Asio 1.22 picks how it allocates aligned handler memory (std::aligned_alloc + free, or
// operator new + delete) from whether a standard header came before its own configuration:
// two translation units of one program that include in different orders then define
// asio::detail::aligned_new/aligned_delete two ways, and memory is freed with the wrong
// function. The shardline targets (CMake, pkg-config, Meson) decide it once for all units.
#if !defined(ASIO_HAS_STD_ALIGNED_ALLOC) && !defined(ASIO_DISABLE_STD_ALIGNED_ALLOC)
#error "shardline: define ASIO_HAS_STD_ALIGNED_ALLOC=1 for every translation unit (the shardline CMake targets, shardline.pc and the Meson dependency do): otherwise Asio's aligned allocation depends on include order (an ODR violation)"
#endif
