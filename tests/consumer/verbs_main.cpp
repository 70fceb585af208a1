// Proves that the installed verbs part compiles and links against libibverbs. It does not
// need an RDMA device: listing the devices (possibly none) is enough to link for real.
#if __has_include(<shardline/verbs.hpp>)
#include <shardline/verbs.hpp>
#endif
#include <shardline/shardline.hpp>

#include <infiniband/verbs.h>

#include <cstdio>

int main() {
  int count = 0;
  if (ibv_device** list = ibv_get_device_list(&count)) ibv_free_device_list(list);
  std::printf("consumer_verbs: linked against libibverbs, %d RDMA device(s) visible\n", count);
  return 0;
}
