/* One worker: an epoll loop owning its connections; runs posted commands.
 *
 * Sockets are edge-triggered (EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET, registered
 * once): on any event the connection's pump runs until no direction makes
 * progress, so no epoll_ctl is needed on the hot path. Listeners are
 * level-triggered with EPOLLEXCLUSIVE in every worker, so the kernel hands each
 * new connection to one idle worker.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "internal.h"

#define MAX_EVENTS 128
#define ACCEPT_BATCH 32

void worker_wake(struct worker *w) {
    uint64_t one = 1;
    ssize_t n = write(w->evfd, &one, sizeof one);
    (void)n; /* EAGAIN: the counter is already non-zero, the worker will wake */
}

void worker_post(struct worker *w, struct cmd_node *node) {
    node->next = NULL;
    pthread_mutex_lock(&w->qlock);
    if (w->qtail)
        w->qtail->next = node;
    else
        w->qhead = node;
    w->qtail = node;
    pthread_mutex_unlock(&w->qlock);
    worker_wake(w);
}

static void cmd_done(struct cmd *c) {
    pthread_mutex_lock(&c->m);
    if (--c->pending == 0) pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->m);
}

static void snapshot_conn(struct cmd *c, struct conn *cn) {
    pthread_mutex_lock(&c->m);
    if (c->nconns == c->capconns) {
        size_t cap = c->capconns ? c->capconns * 2 : 16;
        s2_conn_stats *nv = realloc(c->conns, cap * sizeof *nv);
        if (nv) c->conns = nv;
        const struct route **nr = realloc(c->conn_routes, cap * sizeof *nr);
        if (nr) c->conn_routes = nr;
        if (!nv || !nr) {
            pthread_mutex_unlock(&c->m);
            return;
        }
        c->capconns = cap;
    }
    s2_conn_stats *s = &c->conns[c->nconns];
    memset(s, 0, sizeof *s);
    s->conn_id = cn->id;
    memcpy(s->peer, cn->peer, sizeof s->peer);
    s->target = strdup(cn->target ? cn->target : "");
    s->bytes_to_target = cn->d[0].bytes;
    s->bytes_from_target = cn->d[1].bytes;
    s->started_at = cn->started_at;
    c->conn_routes[c->nconns++] = cn->r;
    pthread_mutex_unlock(&c->m);
}

static void run_commands(struct worker *w) {
    uint64_t v;
    ssize_t n = read(w->evfd, &v, sizeof v);
    (void)n;
    for (;;) {
        pthread_mutex_lock(&w->qlock);
        struct cmd_node *node = w->qhead;
        if (node) {
            w->qhead = node->next;
            if (!w->qhead) w->qtail = NULL;
        }
        pthread_mutex_unlock(&w->qlock);
        if (!node) return;
        struct cmd *c = node->cmd;
        struct route *r = c->route;
        switch (c->type) {
        case CMD_ADD_LISTENER: {
            struct epoll_event ev = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data.ptr = r};
            if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, r->listen_fd, &ev) < 0) {
                pthread_mutex_lock(&c->m);
                c->failed = 1;
                pthread_mutex_unlock(&c->m);
            }
            break;
        }
        case CMD_DEL_LISTENER:
            if (r->listen_fd >= 0) epoll_ctl(w->epfd, EPOLL_CTL_DEL, r->listen_fd, NULL);
            break;
        case CMD_CLOSE_ROUTE_CONNS:
            if (r->listen_fd >= 0) epoll_ctl(w->epfd, EPOLL_CTL_DEL, r->listen_fd, NULL);
            for (struct conn *cn = w->conns, *next; cn; cn = next) {
                next = cn->next;
                if (cn->r == r) conn_close(cn, 0, 0);
            }
            break;
        case CMD_SNAPSHOT:
            for (struct conn *cn = w->conns; cn; cn = cn->next)
                if (!r || cn->r == r) snapshot_conn(c, cn);
            break;
        case CMD_STOP:
            for (struct conn *cn = w->conns, *next; cn; cn = next) {
                next = cn->next;
                conn_close(cn, 0, 0);
            }
            w->stop = 1;
            break;
        }
        cmd_done(c); /* c may be gone after this */
    }
}

static void do_accept(struct worker *w, struct route *r) {
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        if (!atomic_load_explicit(&r->accepting, memory_order_relaxed)) return;
        int fd = accept4(r->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED) return;
            route_error(r, S2_E_ACCEPT);
            if ((errno == EMFILE || errno == ENFILE) && w->reserve_fd >= 0) {
                /* Shed the pending connection so the level-triggered listener
                 * does not spin: give back the reserve fd, accept, close. */
                close(w->reserve_fd);
                w->reserve_fd = -1;
                int x = accept4(r->listen_fd, NULL, NULL, SOCK_CLOEXEC);
                if (x >= 0) close(x);
                w->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
                s2_log_route(r, S2_E_ACCEPT, S2_LOG_WARNING,
                             "route %s: out of file descriptors, connection dropped", r->id);
            }
            return;
        }
        DBG_ADD(w->e, fds, 1);
        conn_accept(w, r, fd);
    }
}

static void run_timers(struct worker *w) {
    w->next_check = INT64_MAX;
    for (struct conn *c = w->conns, *next; c; c = next) {
        next = c->next;
        conn_timers(c);
    }
}

void *worker_main(void *arg) {
    struct worker *w = arg;
    struct s2_engine *e = w->e;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &set, NULL); /* EPIPE comes back as an error instead */
    if (e->t.cpu_affinity) {
        long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
        if (ncpu > 0) {
            cpu_set_t cs;
            CPU_ZERO(&cs);
            CPU_SET(w->idx % ncpu, &cs);
            if (pthread_setaffinity_np(pthread_self(), sizeof cs, &cs) != 0)
                s2_log(e, S2_LOG_WARNING, "could not pin worker %d to CPU %ld", w->idx, w->idx % ncpu);
        }
    }
    struct epoll_event evs[MAX_EVENTS];
    while (!w->stop) {
        int timeout = -1;
        w->now = mono_ns();
        if (w->next_check != INT64_MAX) {
            int64_t d = w->next_check - w->now;
            timeout = d <= 0 ? 0 : (int)((d + 999999) / 1000000);
            if (d > (int64_t)INT_MAX * 1000000) timeout = INT_MAX;
        }
        int n = epoll_wait(w->epfd, evs, MAX_EVENTS, timeout);
        if (n < 0 && errno != EINTR) {
            s2_log(e, S2_LOG_ERROR, "worker %d: epoll_wait failed: %s", w->idx, strerror(errno));
            break;
        }
        w->now = mono_ns();
        int cmds = 0;
        for (int i = 0; i < n; i++) {
            int kind = *(int *)evs[i].data.ptr;
            if (kind == TAG_EVENTFD)
                cmds = 1;
            else if (kind == TAG_LISTENER)
                do_accept(w, (struct route *)evs[i].data.ptr);
            else
                conn_event((struct side *)evs[i].data.ptr, evs[i].events);
        }
        if (w->now >= w->next_check) run_timers(w);
        /* Commands run after the batch: a listener deleted here had no event
         * left in this batch that could touch it after the caller closed it. */
        if (cmds) run_commands(w);
        while (w->dead) {
            struct conn *c = w->dead;
            w->dead = c->next;
            conn_free(c);
        }
    }
    return NULL;
}
