# Finds what shardline's targets link to and names it with stable imported targets:
#   shardline::asio     standalone Asio headers (always; an error when missing)
#   shardline::ibverbs  libibverbs (only when found)
#   shardline::sodium   libsodium (only when found): the pre-shared-key authentication of
#                       network control channels (transport/detail/psk_auth.hpp, verbs)
# Used twice: by the source tree's CMakeLists.txt and by the installed shardlineConfig.cmake,
# so the exported targets can name these targets and a consumer re-finds the same things.
# Debian's libasio-dev ships neither a CMake config nor a .pc file, hence find_path.

if(NOT TARGET shardline::asio)
  find_path(SHARDLINE_ASIO_INCLUDE_DIR asio.hpp
            HINTS ${ASIO_INCLUDE_DIR} ENV ASIO_ROOT
            DOC "Directory holding standalone Asio's asio.hpp")
  if(SHARDLINE_ASIO_INCLUDE_DIR)
    add_library(shardline::asio INTERFACE IMPORTED)
    set_target_properties(shardline::asio PROPERTIES
      INTERFACE_INCLUDE_DIRECTORIES "${SHARDLINE_ASIO_INCLUDE_DIR}"
      INTERFACE_SYSTEM_INCLUDE_DIRECTORIES "${SHARDLINE_ASIO_INCLUDE_DIR}")
  endif()
endif()

# libsodium, through pkg-config (Debian's libsodium-dev ships a .pc file).
macro(shardline_find_sodium)
  if(NOT TARGET shardline::sodium)
    find_package(PkgConfig QUIET)
    if(PKG_CONFIG_FOUND)
      pkg_check_modules(SHARDLINE_PC_SODIUM QUIET IMPORTED_TARGET libsodium)
    endif()
    if(TARGET PkgConfig::SHARDLINE_PC_SODIUM)
      add_library(shardline::sodium INTERFACE IMPORTED)
      set_target_properties(shardline::sodium PROPERTIES
        INTERFACE_LINK_LIBRARIES PkgConfig::SHARDLINE_PC_SODIUM)
    endif()
  endif()
endmacro()

# Call only when the verbs part is wanted (it needs libsodium too: shardline_find_sodium).
macro(shardline_find_ibverbs)
  if(NOT TARGET shardline::ibverbs)
    find_package(PkgConfig QUIET)
    if(PKG_CONFIG_FOUND)
      pkg_check_modules(SHARDLINE_PC_IBVERBS QUIET IMPORTED_TARGET libibverbs)
    endif()
    if(TARGET PkgConfig::SHARDLINE_PC_IBVERBS)
      add_library(shardline::ibverbs INTERFACE IMPORTED)
      set_target_properties(shardline::ibverbs PROPERTIES
        INTERFACE_LINK_LIBRARIES PkgConfig::SHARDLINE_PC_IBVERBS)
    else()
      # No pkg-config (or an ibverbs without a .pc): look for the header and library.
      find_path(SHARDLINE_IBVERBS_INCLUDE_DIR infiniband/verbs.h)
      find_library(SHARDLINE_IBVERBS_LIBRARY ibverbs)
      if(SHARDLINE_IBVERBS_INCLUDE_DIR AND SHARDLINE_IBVERBS_LIBRARY)
        add_library(shardline::ibverbs INTERFACE IMPORTED)
        set_target_properties(shardline::ibverbs PROPERTIES
          INTERFACE_INCLUDE_DIRECTORIES "${SHARDLINE_IBVERBS_INCLUDE_DIR}"
          INTERFACE_LINK_LIBRARIES "${SHARDLINE_IBVERBS_LIBRARY}")
      endif()
    endif()
  endif()
endmacro()

# ---- CUDA (shardline::cuda) -------------------------------------------------------------------
# Call only when the CUDA part is wanted. Defines CUDA::cudart (FindCUDAToolkit) when the CUDA
# Toolkit is found: where CUDAToolkit_ROOT, CUDA_PATH and nvcc on the PATH say nothing,
# /usr/local/cuda is tried (where this project's CI and GPU machines have it).
macro(shardline_find_cuda)
  if(NOT TARGET CUDA::cudart)
    set(_shardline_cuda_hinted FALSE)
    if(DEFINED CUDAToolkit_ROOT OR DEFINED ENV{CUDAToolkit_ROOT} OR DEFINED ENV{CUDA_PATH})
      set(_shardline_cuda_hinted TRUE)
    endif()
    string(REPLACE ":" ";" _shardline_path "$ENV{PATH}")
    foreach(_shardline_dir IN LISTS _shardline_path)
      if(EXISTS "${_shardline_dir}/nvcc")
        set(_shardline_cuda_hinted TRUE)
      endif()
    endforeach()
    if(NOT _shardline_cuda_hinted AND EXISTS /usr/local/cuda/bin/nvcc)
      set(CUDAToolkit_ROOT /usr/local/cuda)
    endif()
    find_package(CUDAToolkit QUIET)
  endif()
endmacro()
