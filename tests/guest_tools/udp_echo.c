/* udp_echo PORT PREFIX: answer every UDP datagram on PORT with PREFIX followed by the datagram.
 * Built static by the tests and run inside the built-in guest, whose busybox has no UDP server
 * (its nc lacks -u). */
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: udp_echo PORT PREFIX\n");
        return 2;
    }
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        perror("udp_echo: bind");
        return 1;
    }
    size_t prefix = strlen(argv[2]);
    char buf[2048];
    if (prefix > sizeof buf / 2) return 2;
    memcpy(buf, argv[2], prefix);
    for (;;) {
        struct sockaddr_in peer;
        socklen_t len = sizeof peer;
        ssize_t n = recvfrom(fd, buf + prefix, sizeof buf - prefix, 0, (struct sockaddr *)&peer, &len);
        if (n < 0) continue;
        sendto(fd, buf, prefix + (size_t)n, 0, (struct sockaddr *)&peer, len);
    }
}
