/* agentvm-handoff SOCKET: QEMU's per-connection guestfwd command, the fast twin of handoff.py.
 *
 * libslirp starts it for each guest connection to the proxy address, with one end of a socketpair
 * as fd 0/1/2. It passes fd 0 to the supervisor over SOCKET (SCM_RIGHTS, one byte of payload) and
 * exits; the bytes then flow between QEMU and the supervisor directly. A C program because it runs
 * once per connection: it starts in about a millisecond, Python's interpreter in 20-100 ms.
 * Exit status: 0 handed over, 1 the supervisor could not be reached, 2 usage.
 */
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (argc != 2 || strlen(argv[1]) >= sizeof addr.sun_path)
        return 2;
    strcpy(addr.sun_path, argv[1]);
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr) != 0)
        return 1;
    char byte = 'c';
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct msghdr msg = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf, .msg_controllen = sizeof control.buf};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    int fd = 0;
    memcpy(CMSG_DATA(cmsg), &fd, sizeof fd);
    return sendmsg(sock, &msg, MSG_NOSIGNAL) == 1 ? 0 : 1;
}
