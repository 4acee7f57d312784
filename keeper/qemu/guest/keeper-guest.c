/*
 * keeper-guest: the guest's input journal and its serial-console relay.
 *
 *   keeper-guest SERIAL JOURNAL SHELL [ARGS...]
 *   e.g. keeper-guest /dev/ttyS0 /dev/ttyS1 /bin/sh
 *
 * The host has to know exactly which input the guest received, so that a test can
 * tell a lost byte from a delayed one across a live migration. The only honest
 * witness is the guest kernel, so this program, started by /init, writes every
 * input it sees to JOURNAL (the second UART; QEMU writes it to a file on the host):
 *
 *   B <kernel release>\n      once, when the journal is live: input from here
 *                             on is recorded; serial input before it is dropped
 *   S <hex bytes>\n           bytes read from SERIAL, before the shell gets them
 *   K <code> <value>\n        EV_KEY events of the keyboards (Linux keycode;
 *                             value 1 press, 0 release, 2 autorepeat)
 *   D\n                        the kernel dropped key events here (its evdev
 *                             buffer overflowed before we read it)
 *
 * This process is the journal's only writer, so records never interleave and their
 * order is the order we read them in. It runs SCHED_FIFO (not inherited by the
 * shells) so that it reads the keyboard before evdev's small buffer overflows, even
 * while the shells keep the guest's one CPU busy.
 *
 * The shell must not read SERIAL itself (it would consume bytes unjournaled), so
 * SERIAL is put in raw mode and relayed to a pty on which SHELL runs as session
 * leader with the pty as its controlling tty (job control and ^C work). Both
 * directions are non-blocking with bounded buffers: a shell that stops reading
 * never stops its output, and vice versa.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/input.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define BUF_SIZE 65536
#define MAX_KBDS 4
#define CHUNK 2048

struct buf {
	unsigned char data[BUF_SIZE];
	size_t len;
};

static int journal_fd = -1;
static const char *serial_path;

static void warnf(const char *fmt, ...)
{
	/* stderr is the console; a warning there is all a guest can do */
	va_list ap;
	va_start(ap, fmt);
	fputs("keeper-guest: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
}

static void die(const char *what)
{
	warnf("%s: %s", what, strerror(errno));
	exit(1);
}

/* Write all of `len` bytes to a blocking fd (the journal). */
static void write_all(int fd, const void *p, size_t len)
{
	const unsigned char *c = p;
	while (len > 0) {
		ssize_t n = write(fd, c, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("write journal");
		}
		c += n;
		len -= (size_t)n;
	}
}

static void set_raw(int fd, const char *what)
{
	struct termios t;
	if (tcgetattr(fd, &t) < 0)
		die(what);
	cfmakeraw(&t);
	t.c_cflag |= CLOCAL | CREAD; /* no modem lines on an emulated UART */
	cfsetispeed(&t, B115200);
	cfsetospeed(&t, B115200);
	t.c_cc[VMIN] = 1;
	t.c_cc[VTIME] = 0;
	if (tcsetattr(fd, TCSANOW, &t) < 0)
		die(what);
}

static int open_tty(const char *path, int flags)
{
	int fd = open(path, flags | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0)
		die(path);
	return fd;
}

static void journal_serial(const unsigned char *p, size_t len)
{
	static const char hex[] = "0123456789abcdef";
	char rec[2 + 2 * CHUNK + 1];
	size_t at = 0;
	rec[at++] = 'S';
	rec[at++] = ' ';
	for (size_t i = 0; i < len; i++) {
		rec[at++] = hex[p[i] >> 4];
		rec[at++] = hex[p[i] & 15];
	}
	rec[at++] = '\n';
	write_all(journal_fd, rec, at);
}

/* A keyboard is an evdev device that has letter keys (not the power button). */
static int is_keyboard(int fd)
{
	unsigned long bits[(KEY_MAX + 1) / (8 * sizeof(unsigned long)) + 1];
	memset(bits, 0, sizeof(bits));
	if (ioctl(fd, EVIOCGBIT(EV_KEY, sizeof(bits)), bits) < 0)
		return 0;
	size_t w = 8 * sizeof(unsigned long);
	return (bits[KEY_A / w] >> (KEY_A % w)) & 1;
}

static int find_keyboards(int *fds)
{
	int n = 0;
	DIR *d = opendir("/dev/input");
	if (!d)
		return 0;
	struct dirent *e;
	while ((e = readdir(d)) && n < MAX_KBDS) {
		if (strncmp(e->d_name, "event", 5) != 0)
			continue;
		char path[300];
		snprintf(path, sizeof(path), "/dev/input/%s", e->d_name);
		int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
		if (fd < 0)
			continue;
		if (is_keyboard(fd)) {
			fds[n++] = fd;
		} else {
			close(fd);
		}
	}
	closedir(d);
	return n;
}

static void journal_keys(int fd)
{
	struct input_event ev[64];
	ssize_t n = read(fd, ev, sizeof(ev));
	if (n <= 0)
		return;
	char rec[64 * 24];
	size_t at = 0;
	for (size_t i = 0; i < (size_t)n / sizeof(ev[0]); i++) {
		if (ev[i].type == EV_KEY)
			at += (size_t)snprintf(rec + at, sizeof(rec) - at, "K %u %d\n",
					       ev[i].code, ev[i].value);
		else if (ev[i].type == EV_SYN && ev[i].code == SYN_DROPPED)
			at += (size_t)snprintf(rec + at, sizeof(rec) - at, "D\n");
	}
	write_all(journal_fd, rec, at);
}

/* Start SHELL on a new pty; returns the master (non-blocking), sets *pid. */
static int spawn_shell(char **argv, pid_t *pid)
{
	int master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0)
		die("pty");
	struct winsize ws = {.ws_row = 24, .ws_col = 80};
	ioctl(master, TIOCSWINSZ, &ws);
	const char *slave = ptsname(master);
	if (!slave)
		die("ptsname");
	*pid = fork();
	if (*pid < 0)
		die("fork");
	if (*pid == 0) {
		signal(SIGHUP, SIG_DFL);
		signal(SIGINT, SIG_DFL);
		signal(SIGPIPE, SIG_DFL);
		setsid();
		int s = open(slave, O_RDWR); /* session leader: the pty becomes its ctty */
		if (s < 0)
			_exit(127);
		ioctl(s, TIOCSCTTY, 0);
		dup2(s, 0);
		dup2(s, 1);
		dup2(s, 2);
		if (s > 2)
			close(s);
		setenv("TERM", "vt100", 1);
		execv(argv[0], argv);
		_exit(127);
	}
	fcntl(master, F_SETFL, fcntl(master, F_GETFL) | O_NONBLOCK);
	return master;
}

/* Move bytes from `b` to `fd` as far as it takes them. */
static void flush(struct buf *b, int fd)
{
	while (b->len > 0) {
		ssize_t n = write(fd, b->data, b->len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN && errno != EIO)
				warnf("write: %s", strerror(errno));
			return;
		}
		memmove(b->data, b->data + n, b->len - (size_t)n);
		b->len -= (size_t)n;
	}
}

static void put(struct buf *b, const void *p, size_t len)
{
	if (len > BUF_SIZE - b->len)
		len = BUF_SIZE - b->len;
	memcpy(b->data + b->len, p, len);
	b->len += len;
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: %s SERIAL JOURNAL SHELL [ARGS...]\n", argv[0]);
		return 2;
	}
	serial_path = argv[1];
	signal(SIGHUP, SIG_IGN);
	signal(SIGINT, SIG_IGN);
	signal(SIGPIPE, SIG_IGN);
	struct sched_param prio = {.sched_priority = 10};
	if (sched_setscheduler(0, SCHED_FIFO | SCHED_RESET_ON_FORK, &prio) < 0)
		warnf("SCHED_FIFO: %s", strerror(errno));

	journal_fd = open_tty(argv[2], O_WRONLY);
	set_raw(journal_fd, argv[2]);
	/* the journal must never drop a record: blocking writes */
	fcntl(journal_fd, F_SETFL, fcntl(journal_fd, F_GETFL) & ~O_NONBLOCK);

	int serial = open_tty(serial_path, O_RDWR);
	set_raw(serial, serial_path);
	/* The console was open (cooked, CR->NL) since the kernel started /init: what it
	 * took in before raw mode is dropped, so the journal holds only unaltered bytes. */
	tcflush(serial, TCIFLUSH);

	/* Keyboards before the boot record: B promises that every input from then on
	 * is journaled. devtmpfs may add the evdev nodes a moment after insmod. */
	int kbds[MAX_KBDS];
	int nkbd = 0;
	for (int tries = 0; tries < 60 && (nkbd = find_keyboards(kbds)) == 0; tries++)
		usleep(50000);
	if (nkbd == 0)
		warnf("no keyboard in /dev/input yet; key events are journaled once it appears");

	struct utsname u;
	uname(&u);
	char rec[sizeof(u.release) + 4];
	int len = snprintf(rec, sizeof(rec), "B %s\n", u.release);
	write_all(journal_fd, rec, (size_t)len);

	static struct buf to_shell, to_serial;
	char banner[sizeof(u.release) + 64];
	len = snprintf(banner, sizeof(banner), "\r\nkeeper-guest %s ready\r\n", u.release);
	put(&to_serial, banner, (size_t)len);

	pid_t shell = -1;
	int master = -1;
	struct timespec respawn_at = {0, 0};

	for (;;) {
		struct timespec now;
		clock_gettime(CLOCK_MONOTONIC, &now);
		if (master < 0 && (now.tv_sec > respawn_at.tv_sec ||
				   (now.tv_sec == respawn_at.tv_sec &&
				    now.tv_nsec >= respawn_at.tv_nsec)))
			master = spawn_shell(argv + 3, &shell);
		if (nkbd == 0)
			nkbd = find_keyboards(kbds); /* evdev nodes may appear late */

		struct pollfd p[2 + MAX_KBDS];
		p[0].fd = serial;
		p[0].events = (to_shell.len < BUF_SIZE ? POLLIN : 0) |
			      (to_serial.len ? POLLOUT : 0);
		p[1].fd = master;
		p[1].events = (to_serial.len < BUF_SIZE ? POLLIN : 0) |
			      (to_shell.len ? POLLOUT : 0);
		for (int i = 0; i < nkbd; i++) {
			p[2 + i].fd = kbds[i];
			p[2 + i].events = POLLIN;
		}
		int timeout = (nkbd == 0 || master < 0) ? 200 : -1;
		if (poll(p, (nfds_t)(2 + nkbd), timeout) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}

		int kept = 0;
		for (int i = 0; i < nkbd; i++) {
			if (p[2 + i].revents & POLLIN)
				journal_keys(kbds[i]);
			if (p[2 + i].revents & (POLLERR | POLLHUP | POLLNVAL))
				close(kbds[i]); /* unplugged: never spin on it */
			else
				kbds[kept++] = kbds[i];
		}
		nkbd = kept;
		if (p[0].revents & (POLLERR | POLLHUP | POLLNVAL)) {
			errno = EIO;
			die(serial_path); /* /init starts us again */
		}

		if (p[0].revents & POLLIN) {
			unsigned char in[CHUNK];
			size_t room = BUF_SIZE - to_shell.len;
			ssize_t n = read(serial, in, room < CHUNK ? room : CHUNK);
			if (n > 0) {
				/* journal first: the record says what the guest received */
				journal_serial(in, (size_t)n);
				put(&to_shell, in, (size_t)n);
			}
		}
		if (master >= 0 && (p[1].revents & (POLLIN | POLLHUP | POLLERR))) {
			unsigned char out[CHUNK];
			size_t room = BUF_SIZE - to_serial.len;
			ssize_t n = read(master, out, room < CHUNK ? room : CHUNK);
			if (n > 0) {
				put(&to_serial, out, (size_t)n);
			} else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
				/* the shell is gone (EIO on the master): start another */
				close(master);
				master = -1;
				waitpid(shell, NULL, 0);
				shell = -1;
				clock_gettime(CLOCK_MONOTONIC, &respawn_at);
				respawn_at.tv_sec += 1;
			}
		}
		if (master >= 0)
			flush(&to_shell, master);
		flush(&to_serial, serial);
	}
}
