// ioctls is the traced process of the tracer's policy tests: it makes the
// calls a compromised QEMU might make and prints what each returned, one
// "NAME ERRNO" line per call (ERRNO 0 when it succeeded). Its ioctls go
// to /dev/null, which fails every request with ENOTTY, so ENOTTY means
// "reached the kernel" and anything else is the tracer's doing.
//
// Built by the tests with gcc; not part of kvmscope.
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#define KVM_CREATE_VCPU 0xae41UL
#define KVM_SET_USER_MEMORY_REGION 0x4020ae46UL
#define KVM_SET_MSRS 0x4008ae89UL
#define KVM_CREATE_DEVICE 0xc00caee0UL

static void report(const char *name, long r) {
	printf("%s %d\n", name, r < 0 ? errno : 0);
	fflush(stdout);
}

struct msrs {
	uint32_t nmsrs, pad;
	struct { uint32_t index, reserved; uint64_t data; } e[2];
};

static void *idle(void *arg) {
	(void)arg;
	for (;;)
		pause();
	return NULL;
}

static int fd;

static long one(const char *s);

static void on_usr1(int sig) { (void)sig; }

int main(int argc, char **argv) {
	fd = open("/dev/null", O_RDWR);
	if (fd < 0)
		return 1;
	for (int i = 1; i < argc; i++) {
		const char *s = argv[i];
		if (!strncmp(s, "threads:", 8)) {
			// Idle threads, as QEMU has (I/O, RCU, workers): a freeze
			// must stop each of them.
			for (int n = atoi(s + 8); n > 0; n--) {
				pthread_t t;
				pthread_create(&t, NULL, idle, NULL);
			}
			continue;
		}
		if (!strcmp(s, "serve")) {
			// Wait in pause(), as QEMU's vCPU threads wait in KVM_RUN,
			// with a SIGUSR1 handler (QEMU's kick), for the injection
			// tests: each wake-up is a line.
			signal(SIGUSR1, on_usr1);
			printf("serving\n");
			fflush(stdout);
			for (;;) {
				long r = pause();
				printf("woke %ld %d\n", r, errno);
				fflush(stdout);
			}
		}
		if (!strncmp(s, "repeat:", 7)) {
			// repeat:N:NAME makes the call N times, between a "start"
			// line and its report, for the benchmarks.
			char *end;
			long n = strtol(s + 7, &end, 10);
			const char *name = end + 1;
			long r = 0;
			printf("start\n");
			fflush(stdout);
			for (long k = 0; k < n; k++)
				r = one(name);
			report(name, r);
			continue;
		}
		long r = one(s);
		if (r == -2)
			return 2;
		report(s, r);
	}
	return 0;
}

// one makes the call named s.
static long one(const char *s) {
	long r;
	{
		if (!strcmp(s, "vcpu1")) {
			r = ioctl(fd, KVM_CREATE_VCPU, 1UL);
		} else if (!strcmp(s, "vcpu2")) {
			r = ioctl(fd, KVM_CREATE_VCPU, 2UL);
		} else if (!strcmp(s, "vcpu2-highbits")) {
			// The kernel ignores the request's upper 32 bits.
			r = syscall(SYS_ioctl, fd, 0xffffffff00000000UL | KVM_CREATE_VCPU, 2UL);
		} else if (!strcmp(s, "region-unreadable")) {
			r = ioctl(fd, KVM_SET_USER_MEMORY_REGION, (void *)16);
		} else if (!strcmp(s, "msrs-lstar") || !strcmp(s, "msrs-other")) {
			struct msrs m = {.nmsrs = 2};
			m.e[0].index = 0x10;
			m.e[1].index = s[5] == 'l' ? 0xc0000082 : 0x11;
			r = ioctl(fd, KVM_SET_MSRS, &m);
		} else if (!strcmp(s, "msrs-unreadable")) {
			r = ioctl(fd, KVM_SET_MSRS, (void *)16);
		} else if (!strcmp(s, "create-device")) {
			uint32_t dev[3] = {4 /* KVM_DEV_TYPE_VFIO */, 0, 0};
			r = ioctl(fd, KVM_CREATE_DEVICE, dev);
		} else if (!strcmp(s, "i386-getpid")) {
			// getpid (20) through the i386 ABI.
			long ret;
			__asm__ volatile("int $0x80" : "=a"(ret) : "a"(20L) : "memory");
			if (ret < 0 && ret > -4096) {
				errno = -ret;
				r = -1;
			} else {
				r = 0;
			}
		} else if (!strcmp(s, "x32-getpid")) {
			r = syscall(0x40000000L | SYS_getpid);
		} else if (!strcmp(s, "tcgets")) {
			r = ioctl(fd, 0x5401UL, (void *)0);
		} else {
			fprintf(stderr, "unknown call %s\n", s);
			errno = 0;
			return -2;
		}
	}
	return r;
}
