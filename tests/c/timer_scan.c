/* Load for profiling the worker's timer scan (not a test; `make -C tests/c timer-scan`).
 *
 * One engine with one worker carries N busy rate-limited connections: a client thread
 * keeps every connection's socket full, a sink thread drains the target side. Every
 * timer fire makes the worker scan all of its connections (worker.c run_timers ->
 * conn.c conn_timers), so profile the worker thread, e.g.
 *   perf record -g -o p.data ./timer_scan 1000 1000 20000000 10
 *   perf report -i p.data --comm s2worker --no-children --sort symbol
 * Arguments: connections, routes (each with its own rate cap; connections are spread
 * over them), rate per route in bytes/s, seconds. Loopback only.
 *
 * Measured (issue 11, 2-core VM shared with other jobs, perf at 999 Hz, 10 s): share of
 * the worker thread's samples in conn_timers + run_timers (inlined into worker_main),
 * and from a counting build, how many of the scanned connections were due:
 *   1000 routes x 200 kB/s   2.1 %   472 fires/s, 1000 scanned per fire,  9.7 % due
 *   1000 routes x  50 kB/s   4.0 %   536 fires/s, 1000 scanned per fire,  2.0 % due
 *   1 route 50 MB/s, shared 10.3 %   893 fires/s,  999 scanned per fire, 86.7 % due
 * Under the 5 % bar where connections have their own caps. With one cap shared by
 * all, the cost is not the scan: every waiting connection gets the same wake time,
 * so each fire wakes ~all of them and few get tokens (a pairing heap visiting only
 * due connections kept conn_timers at the same cost and added its own; it was not
 * kept). That herd is pump.c's rate_grant: a per-route queue of waiters would fix it. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "engine.h"

static atomic_int stop;
static atomic_llong sunk;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static int listener(int *port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t l = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 4096) < 0 ||
        getsockname(fd, (struct sockaddr *)&a, &l) < 0)
        die("listener");
    *port = ntohs(a.sin_port);
    return fd;
}

/* Accept everything on lfd and read it away. */
static void *sink_main(void *arg) {
    int lfd = *(int *)arg;
    pthread_setname_np(pthread_self(), "sink");
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    static char buf[1 << 16];
    struct epoll_event evs[256];
    while (!atomic_load(&stop)) {
        int n = epoll_wait(ep, evs, 256, 100);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                int c;
                while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    struct epoll_event ce = {.events = EPOLLIN | EPOLLET, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ce);
                }
                continue;
            }
            ssize_t r;
            while ((r = read(fd, buf, sizeof buf)) > 0) atomic_fetch_add(&sunk, r);
            if (r == 0) close(fd);
        }
    }
    close(ep);
    return NULL;
}

struct clients {
    int *fds;
    int n;
};

/* Keep every client socket full. */
static void *client_main(void *arg) {
    struct clients *cl = arg;
    pthread_setname_np(pthread_self(), "client");
    int ep = epoll_create1(EPOLL_CLOEXEC);
    for (int i = 0; i < cl->n; i++) {
        struct epoll_event ev = {.events = EPOLLOUT | EPOLLET, .data.fd = cl->fds[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, cl->fds[i], &ev);
    }
    static char buf[1 << 16];
    memset(buf, 'x', sizeof buf);
    struct epoll_event evs[256];
    while (!atomic_load(&stop)) {
        int n = epoll_wait(ep, evs, 256, 100);
        for (int i = 0; i < n; i++)
            while (write(evs[i].data.fd, buf, sizeof buf) > 0) {
            }
    }
    close(ep);
    return NULL;
}

int main(int argc, char **argv) {
    int nconn = argc > 1 ? atoi(argv[1]) : 1000;
    int nroutes = argc > 2 ? atoi(argv[2]) : nconn;
    unsigned long long rate = argc > 3 ? strtoull(argv[3], NULL, 10) : 20000000ULL;
    double secs = argc > 4 ? atof(argv[4]) : 10;
    if (nconn < 1 || nroutes < 1 || nroutes > nconn) {
        fprintf(stderr, "usage: timer_scan CONNECTIONS ROUTES RATE_PER_ROUTE SECONDS\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);

    int tport, tfd = listener(&tport);
    pthread_t sink;
    if (pthread_create(&sink, NULL, sink_main, &tfd) != 0) die("sink");

    /* The worker thread inherits this name: perf report --comm s2worker. */
    pthread_setname_np(pthread_self(), "s2worker");
    s2_tuning t;
    s2_tuning_defaults(&t);
    t.workers = 1;
    s2_engine *e = NULL;
    char err[256] = "";
    if (s2_engine_new(&t, &e, err, sizeof err) != S2_OK) {
        fprintf(stderr, "engine: %s\n", err);
        return 2;
    }
    pthread_setname_np(pthread_self(), "main");
    int *ports = calloc((size_t)nroutes, sizeof *ports);
    for (int i = 0; i < nroutes; i++) {
        char id[32], bound[80];
        snprintf(id, sizeof id, "r%d", i);
        s2_target_spec tg = {"127.0.0.1", tport};
        s2_route_spec r = {.route_id = id, .listen_host = "127.0.0.1", .listen_fd = -1, .targets = &tg,
                           .ntargets = 1, .rate_limit = rate};
        if (s2_route_add(e, &r, bound, sizeof bound, err, sizeof err) != S2_OK) {
            fprintf(stderr, "route: %s\n", err);
            return 2;
        }
        ports[i] = atoi(strrchr(bound, ':') + 1);
    }
    struct clients cl = {.fds = calloc((size_t)nconn, sizeof(int)), .n = nconn};
    for (int i = 0; i < nconn; i++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)ports[i % nroutes]),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
        cl.fds[i] = fd;
        if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0) die("nonblock");
    }
    pthread_t client;
    if (pthread_create(&client, NULL, client_main, &cl) != 0) die("client");
    double t0 = now_s();
    long long s0 = atomic_load(&sunk);
    while (now_s() - t0 < secs) {
        struct timespec ts = {0, 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    double dt = now_s() - t0;
    long long moved = atomic_load(&sunk) - s0;
    s2_stats *st = NULL;
    long long active = 0;
    if (s2_engine_stats(e, NULL, 0, &st, err, sizeof err) == S2_OK)
        for (size_t i = 0; i < st->nroutes; i++) active += st->routes[i].connections_active;
    s2_stats_free(st);
    printf("connections %d (active %lld) routes %d rate/route %llu B/s: %.1f MB/s through in %.1f s "
           "(cap %.1f MB/s)\n",
           nconn, active, nroutes, rate, (double)moved / dt / 1e6, dt, (double)rate * nroutes / 1e6);
    atomic_store(&stop, 1);
    pthread_join(client, NULL);
    for (int i = 0; i < nconn; i++) close(cl.fds[i]);
    s2_engine_free(e);
    pthread_join(sink, NULL);
    close(tfd);
    free(cl.fds);
    free(ports);
    return 0;
}
