# CTest `consumer`: install this build into a scratch prefix, then configure, build and run
# tests/consumer against that prefix twice, via find_package(shardline CONFIG) and via
# pkg-config. Nothing from the source tree is on the consumer's include path.
# cmake -DSHARDLINE_SOURCE_DIR=.. -DSHARDLINE_BINARY_DIR=.. -DWORK_DIR=.. -DGENERATOR=..
#       -DCXX_COMPILER=.. -DCONFIG=.. -DDATADIR=share -DWITH_VERBS=ON|OFF -P consumer_test.cmake

function(run step)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "consumer test: ${step} failed (${rc}): ${ARGN}")
  endif()
endfunction()

set(prefix ${WORK_DIR}/prefix)
file(REMOVE_RECURSE ${WORK_DIR})
set(config_args)
if(CONFIG)
  set(config_args --config ${CONFIG})
endif()
run("install" ${CMAKE_COMMAND} --install ${SHARDLINE_BINARY_DIR} --prefix ${prefix} ${config_args})

# The installed tree must not point back into the source tree.
file(GLOB_RECURSE installed_cmake ${prefix}/*.cmake ${prefix}/*.pc)
foreach(f IN LISTS installed_cmake)
  file(READ ${f} text)
  string(FIND "${text}" "${SHARDLINE_SOURCE_DIR}" at)
  if(NOT at EQUAL -1)
    message(FATAL_ERROR "consumer test: installed ${f} refers to the source tree")
  endif()
endforeach()

foreach(via cmake pkgconfig)
  set(build ${WORK_DIR}/build-${via})
  if(via STREQUAL "pkgconfig")
    # Only the scratch prefix's .pc files: not a system-wide shardline.pc, if any.
    set(ENV{PKG_CONFIG_PATH} ${prefix}/${DATADIR}/pkgconfig)
  endif()
  run("configure (${via})" ${CMAKE_COMMAND} -S ${SHARDLINE_SOURCE_DIR}/tests/consumer -B ${build}
      -G ${GENERATOR} -DCMAKE_CXX_COMPILER=${CXX_COMPILER} -DCMAKE_BUILD_TYPE=${CONFIG}
      -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
      -DSHARDLINE_CONSUMER_VIA=${via} -DSHARDLINE_CONSUMER_VERBS=${WITH_VERBS}
      -DSHARDLINE_EXPECTED_PREFIX=${prefix})
  run("build (${via})" ${CMAKE_COMMAND} --build ${build} ${config_args})
  run("run (${via})" ${CMAKE_CTEST_COMMAND} --test-dir ${build} --output-on-failure ${config_args})
endforeach()
message(STATUS "consumer test: find_package and pkg-config consumers built and ran")
