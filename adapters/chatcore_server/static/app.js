// chatcore browser client: speaks the chatcore.v1 JSON protocol over one WebSocket.
//
// The server numbers every room's messages 1, 2, 3...; this page keeps the messages
// it has seen per room keyed by that offset, so a replay after a resume, a history
// page and a live message can all arrive in any mix without showing anything twice.
// No build step and no dependencies: this file is served as is.
"use strict";

(() => {
  const SUBPROTOCOL = "chatcore.v1";
  const NAME = /^[A-Za-z0-9_.\-]{1,64}$/;
  const TYPING_SHOW_MS = 6000; // forget a typing indicator nobody refreshed
  const TYPING_SEND_MS = 2500; // refresh ours within half the server's lifetime
  const PAGE = 50; // messages per history page
  const GAP_FILL_MAX = 100; // the server's largest history page
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_MAX_MS = 30000;
  const GROUP_MS = 5 * 60 * 1000; // consecutive messages of one sender within this share a header
  const KEEP = 1500; // messages kept per room; older ones come back from history on scrolling up

  const $ = (id) => document.getElementById(id);

  const state = {
    user: null,
    auth: null, // a JWT for servers started with --jwt-secret
    token: null, // resume token of the current session
    session: null,
    ws: null,
    welcomed: false, // the current socket got its welcome
    everWelcomed: false,
    attempt: 0,
    retryTimer: null,
    stopped: false,
    removedWhy: "", // why a moderator removed us from the server, until the close
    rooms: new Map(), // name -> room, in sidebar order
    active: null,
    pending: new Map(), // client id -> {room, to, text, at, failed}, in the order typed
    inflight: null, // the one message sent and not yet acknowledged
    holdTimer: null, // set while the server asks us to slow down
    seq: 0,
    lineSeq: 0,
    typingSentAt: 0,
    readTimer: null,
    call: null, // the call in progress or ringing (one at a time)
    endedCalls: new Set(), // ids of calls over here: late errors about them are moot
    iceServers: [], // from GET /config.json
  };

  // -- rooms ------------------------------------------------------------------------

  function newRoom(name) {
    return {
      name,
      epoch: null,
      last: 0, // highest offset delivered on this session: the resume point
      head: 0, // highest offset known (also from our own acks)
      read: 0, // our read mark
      sentRead: 0, // the read mark the server has from us
      messages: new Map(), // offset -> message
      lines: [], // join/leave lines: {after: offset, seq, text}
      members: [],
      typing: new Map(), // user -> expiry (ms)
      reads: new Map(), // user -> offset
      more: null, // older history exists (null: not asked yet)
      loading: false,
      joined: false,
      dmTo: null, // a direct-message room not yet on the server: its other user
      scrollTop: null, // where the reader left this room (null: at the bottom)
    };
  }

  function dmUsers(name) {
    const m = /^dm:([^:]+):([^:]+)$/.exec(name);
    return m ? [m[1], m[2]] : null;
  }

  function dmName(a, b) {
    return a < b ? `dm:${a}:${b}` : `dm:${b}:${a}`;
  }

  function roomLabel(name) {
    const pair = dmUsers(name);
    if (pair) return "@" + (pair[0] === state.user ? pair[1] : pair[0]);
    return "#" + name;
  }

  function ensureRoom(name) {
    let room = state.rooms.get(name);
    if (!room) {
      room = newRoom(name);
      state.rooms.set(name, room);
    }
    return room;
  }

  function resetRoom(room, epoch) {
    // The server's log restarted its numbering: what we hold cannot be merged.
    room.epoch = epoch;
    room.messages.clear();
    room.dom = null;
    room.lines = [];
    room.last = 0;
    room.head = 0;
    room.read = 0;
    room.more = null;
  }

  function checkEpoch(room, epoch) {
    if (!epoch) return;
    if (room.epoch !== null && room.epoch !== epoch) resetRoom(room, epoch);
    room.epoch = epoch;
  }

  function unread(room) {
    return Math.max(0, room.head - room.read);
  }

  // -- the connection ---------------------------------------------------------------

  function connectUrl() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const q = new URLSearchParams();
    q.append("user", state.user);
    if (state.auth) q.append("token", state.auth);
    for (const room of state.rooms.values()) {
      if (!room.dmTo) q.append("room", room.name);
    }
    if (state.token) {
      q.append("resume", state.token);
      for (const room of state.rooms.values()) {
        if (room.joined) q.append("offset", `${room.name}:${room.last}`);
      }
    }
    // Relative to the page, so that a page mounted under a prefix (/chat/) finds /chat/ws.
    const base = location.pathname.replace(/[^/]*$/, "");
    return `${proto}//${location.host}${base}ws?${q}`;
  }

  function connect() {
    clearTimeout(state.retryTimer);
    state.retryTimer = null;
    if (state.stopped || state.ws) return;
    let ws;
    try {
      ws = new WebSocket(connectUrl(), SUBPROTOCOL);
    } catch (err) {
      scheduleReconnect();
      return;
    }
    state.ws = ws;
    state.welcomed = false;
    setConn(state.everWelcomed ? "reconnecting" : "connecting");
    ws.onmessage = (e) => {
      if (state.ws !== ws || typeof e.data !== "string") return;
      let event;
      try {
        event = JSON.parse(e.data);
      } catch {
        return;
      }
      handle(event);
    };
    ws.onclose = (e) => {
      if (state.ws !== ws) return;
      state.ws = null;
      state.welcomed = false;
      state.inflight = null; // sent again, with the same id, after the next welcome
      if (e.code === 4003) return removedFromServer(e.reason);
      if (e.code === 1008) {
        // Policy violation (e.g. an invalid name): retrying would be refused again.
        state.stopped = true;
        setConn("failed", e.reason || "the server refused this connection");
        return;
      }
      scheduleReconnect();
    };
  }

  function scheduleReconnect() {
    if (state.stopped || state.retryTimer) return;
    setConn(state.everWelcomed ? "reconnecting" : "connecting");
    if (navigator.onLine === false) return; // the "online" event reconnects
    // Exponential backoff with jitter, so that a restarted server is not hit by
    // every client at the same instant.
    const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** state.attempt);
    const delay = cap / 2 + Math.random() * (cap / 2);
    state.attempt = Math.min(state.attempt + 1, 16);
    state.retryTimer = setTimeout(connect, delay);
  }

  function dropConnection() {
    // Test hook: lose the socket the way a dead network does, then reconnect as usual.
    const ws = state.ws;
    if (!ws) return;
    state.ws = null;
    state.welcomed = false;
    state.inflight = null;
    ws.onmessage = null;
    ws.onclose = null;
    ws.close(4001, "dropped");
    scheduleReconnect();
  }

  function send(frame) {
    if (!state.ws || !state.welcomed) return false;
    state.ws.send(JSON.stringify(frame));
    return true;
  }

  window.addEventListener("online", () => {
    if (!state.user || state.stopped || state.ws) return;
    state.attempt = 0;
    connect(); // now, not when the backoff timer would have fired
  });
  window.addEventListener("offline", () => {
    if (!state.user || state.stopped) return;
    // A socket on a dead network can take minutes to notice. Let it go now; the
    // session waits on the server for its grace period and resumes on "online".
    if (state.ws) dropConnection();
    setConn(state.everWelcomed ? "reconnecting" : "connecting");
  });

  // -- events from the server -------------------------------------------------------

  function handle(ev) {
    switch (ev.type) {
      case "welcome": return onWelcome(ev);
      case "members": return onMembers(ev);
      case "message": return onMessage(e2eIncoming(ev), true);
      case "ack": return onAck(ev);
      case "history": return onHistory(ev);
      case "joined": return onJoined(ev);
      case "left": return onLeft(ev);
      case "presence": return onPresence(ev);
      case "typing": return onTyping(ev);
      case "read": return onRead(ev);
      case "error": return e2eClaimRefused(ev) || onError(ev);
      case "keys": case "keys_published": case "keys_low": return onKeysEvent(ev);
      case "call": case "ringing": case "offer": case "answer": case "candidate": case "ended":
        return onCallSignal(ev);
      case "deleted": return onDeleted(ev);
      case "removed": return onRemoved(ev);
      default: return undefined; // a newer server: ignore what we do not know
    }
  }

  function onWelcome(ev) {
    const hadSession = state.token !== null;
    // Answers to requests made on an earlier connection are lost with it.
    for (const room of state.rooms.values()) room.loading = false;
    state.token = ev.resume;
    state.session = ev.session;
    state.user = ev.user;
    state.welcomed = true;
    state.attempt = 0;
    if (hadSession && !ev.resumed) {
      // The old session expired: whatever was said meanwhile has to come from history.
      addLineEverywhere("Reconnected as a new session");
    }
    for (const [name, pos] of Object.entries(ev.rooms)) {
      const room = ensureRoom(name);
      const fresh = room.epoch === null;
      checkEpoch(room, pos.epoch);
      const gap = pos.offset - room.last;
      room.joined = true;
      room.dmTo = null;
      // A room never read before: what was said before we came is not "unread",
      // except in a conversation with us (the server joined it for its unread messages).
      const before = fresh && pos.read === 0 && !dmUsers(name) ? pos.offset : pos.read;
      room.read = Math.max(room.read, before);
      room.sentRead = pos.read; // what the server holds; markRead sends anything newer
      if (!ev.resumed && room.messages.size && gap > 0) {
        if (gap > GAP_FILL_MAX) {
          resetRoom(room, pos.epoch);
        } else {
          requestHistory(room, pos.offset + 1, gap);
        }
      }
      room.last = pos.offset;
      room.head = Math.max(room.head, pos.offset);
    }
    for (const room of [...state.rooms.values()]) {
      if (!(room.name in ev.rooms) && !room.dmTo) room.joined = false;
    }
    if (!state.active || !state.rooms.has(state.active)) {
      state.active = Object.keys(ev.rooms)[0] || state.rooms.keys().next().value || null;
    }
    state.everWelcomed = true;
    e2eStart();
    setConn("open");
    state.inflight = null;
    pumpSends();
    for (const room of state.rooms.values()) {
      if (room.joined && room.messages.size === 0 && room.last > 0 && !room.loading) {
        requestHistory(room, room.last + 1, PAGE);
      }
    }
    saveUrl();
    render();
  }

  function onMembers(ev) {
    const room = ensureRoom(ev.room);
    checkEpoch(room, ev.epoch);
    const wasJoined = room.joined;
    room.joined = true;
    room.dmTo = null;
    room.members = ev.users.slice().sort(byName);
    if (!wasJoined) {
      pumpSends();
      if (room.read === 0) room.read = ev.offset;
      room.last = Math.max(room.last, ev.offset);
      room.head = Math.max(room.head, ev.offset);
      if (room.messages.size === 0 && ev.offset > 0 && !room.loading) {
        requestHistory(room, ev.offset + 1, PAGE);
      }
      saveUrl();
    }
    render();
  }

  function onMessage(m, live) {
    const room = ensureRoom(m.room);
    checkEpoch(room, m.epoch);
    if (live) room.last = Math.max(room.last, m.offset);
    room.head = Math.max(room.head, m.offset);
    room.typing.delete(m.from);
    const had = room.messages.get(m.offset);
    // Already shown (a replay or a history page): only news of its deletion counts.
    if (had && !had.local && !(m.deleted && !had.deleted)) return;
    room.messages.set(m.offset, m);
    if (live && room.messages.size > KEEP && (room.name !== state.active || atBottom())) {
      forgetOldest(room);
    }
    if (m.from === state.user && m.id) {
      // Our own message, sent from this page or another one of ours.
      clearPending(m.id);
      room.read = Math.max(room.read, m.offset);
    }
    if (live) render({ arrived: m });
  }

  function forgetOldest(room) {
    const offsets = [...room.messages.keys()].sort((a, b) => a - b);
    for (const o of offsets.slice(0, offsets.length - KEEP)) room.messages.delete(o);
    room.more = true;
  }

  function onAck(ev) {
    const p = state.pending.get(ev.id);
    const room = ensureRoom(ev.room);
    checkEpoch(room, ev.epoch); // the log may have restarted the room: our ack tells first
    room.head = Math.max(room.head, ev.offset);
    room.read = Math.max(room.read, ev.offset);
    if (p && !room.messages.has(ev.offset)) {
      room.messages.set(ev.offset, {
        room: ev.room,
        offset: ev.offset,
        from: state.user,
        text: p.text,
        locked: p.enc ? "open" : undefined,
        ts: new Date(p.at).toISOString(),
        id: ev.id,
        local: true, // the server's copy (with its timestamp) replaces it if it comes
      });
    }
    clearPending(ev.id);
    scheduleRead();
    render({ arrived: { from: state.user } });
  }

  function onHistory(ev) {
    const room = ensureRoom(ev.room);
    room.loading = false;
    for (const m of ev.messages) onMessage(e2eIncoming(m), false);
    const oldest = ev.messages.length ? ev.messages[0].offset : null;
    if (oldest === null || oldest <= minOffset(room)) room.more = ev.more;
    render({ history: room.name });
  }

  function removeRoom(name) {
    state.rooms.delete(name);
    for (const [id, p] of state.pending) if (p.room === name) clearPending(id);
    if (state.active === name) state.active = state.rooms.keys().next().value || null;
    saveUrl();
    render();
  }

  function onJoined(ev) {
    const room = state.rooms.get(ev.room);
    if (!room) return;
    if (!room.members.includes(ev.user)) room.members = [...room.members, ev.user].sort(byName);
    addLine(room, `${ev.user} joined`);
    render();
  }

  function onLeft(ev) {
    const room = state.rooms.get(ev.room);
    if (!room) return;
    if (ev.user === state.user) {
      removeRoom(ev.room);
      return;
    }
    room.members = room.members.filter((u) => u !== ev.user);
    room.typing.delete(ev.user);
    addLine(room, `${ev.user} left`);
    render();
  }

  // A crowded room's comings and goings, together (protocol.md, "presence"): each
  // name is where that user is now, so they are applied as set operations.
  function onPresence(ev) {
    const room = state.rooms.get(ev.room);
    if (!room) return;
    const members = new Set(room.members);
    for (const u of ev.joins) members.add(u);
    for (const u of ev.leaves) { members.delete(u); room.typing.delete(u); }
    room.members = [...members].sort(byName);
    const joins = ev.joins.filter((u) => u !== state.user);
    const some = (users) => users.length <= 3
      ? users.join(", ") : `${users.slice(0, 3).join(", ")} and ${users.length - 3} more`;
    if (joins.length) addLine(room, `${some(joins)} joined`);
    if (ev.leaves.length) addLine(room, `${some(ev.leaves)} left`);
    render();
  }

  function onTyping(ev) {
    const room = state.rooms.get(ev.room);
    if (!room || ev.user === state.user) return;
    if (ev.active === false) room.typing.delete(ev.user);
    else room.typing.set(ev.user, Date.now() + TYPING_SHOW_MS);
    renderTyping();
  }

  function onRead(ev) {
    const room = state.rooms.get(ev.room);
    if (!room) return;
    if (ev.user === state.user) {
      room.read = Math.max(room.read, ev.offset); // read in another tab
      renderRooms();
      return;
    }
    room.reads.set(ev.user, ev.offset);
    render();
  }

  function onError(ev) {
    if (ev.ref && state.endedCalls.has(ev.ref)) return; // about a call already over here
    if (state.call && ev.ref === state.call.id) {
      // The server knows no such call of ours (it ended meanwhile): so be it here too.
      if (ev.code === "no_call" || ev.code === "forbidden" || ev.code === "invalid_name") {
        endCall(state.call, ev.message || ev.code);
      } else {
        toast(ev.message || ev.code);
      }
      return;
    }
    const p = ev.ref ? state.pending.get(ev.ref) : null;
    if (p) {
      if (state.inflight === ev.ref) state.inflight = null;
      if (ev.code === "rate_limited") {
        // Hold the whole queue, not just this message, so that order is kept.
        clearTimeout(state.holdTimer);
        state.holdTimer = setTimeout(() => {
          state.holdTimer = null;
          pumpSends();
        }, Math.max(100, (ev.retry_after || 1) * 1000));
        return;
      }
      p.failed = ev.message;
      pumpSends();
      render();
      return;
    }
    const room = ev.ref ? state.rooms.get(ev.ref) : null;
    if (room && (ev.code === "forbidden" || ev.code === "not_member" || ev.code === "room_limit")
        && !room.joined) {
      removeRoom(room.name);
    }
    toast(ev.message || ev.code);
  }

  // -- moderation: deleted messages, being removed ------------------------------------

  function onDeleted(ev) {
    const room = state.rooms.get(ev.room);
    const m = room && room.messages.get(ev.offset);
    if (!m) return; // not loaded here: a history page will show it deleted
    // A copy: an encrypted message still being decrypted fills in the old one.
    room.messages.set(ev.offset, { ...m, text: "", deleted: true, enc: undefined, locked: undefined });
    render();
  }

  function showDeleted(li, text) {
    li.classList.add("deleted");
    text.textContent = "This message was deleted.";
  }

  function onRemoved(ev) {
    const why = ev.reason ? ` (${ev.reason})` : "";
    if (ev.room === null) {
      state.removedWhy = why; // the close (4003) follows
      return;
    }
    removeRoom(ev.room);
    toast(`A moderator removed you from ${roomLabel(ev.room)}${why}.`);
  }

  function removedFromServer(reason) {
    // Removed by a moderator: reconnecting would only start a fresh session, so stop.
    state.stopped = true;
    const why = state.removedWhy || (reason ? ` (${reason})` : "");
    setConn("failed", `a moderator removed you from this server${why}.`);
  }

  // -- what the user does -----------------------------------------------------------

  function newId() {
    state.seq += 1;
    const rand = Math.random().toString(36).slice(2, 8);
    return `${Date.now().toString(36)}-${rand}-${state.seq}`;
  }

  function sendText(text) {
    const room = state.rooms.get(state.active);
    if (!room || !text.trim()) return;
    const id = newId();
    state.pending.set(id, {
      room: room.name,
      to: room.dmTo || dmPeer(room.name),
      text,
      at: Date.now(),
      failed: null,
    });
    e2eQueue(state.pending.get(id));
    pumpSends();
    room.scrollTop = null;
    render({ arrived: { from: state.user } });
  }

  function dmPeer(name) {
    const pair = dmUsers(name);
    if (!pair) return null;
    return pair[0] === state.user ? pair[1] : pair[0];
  }

  function pumpSends() {
    // One message in flight at a time: the server orders messages as they arrive,
    // so a retried message must never overtake (or be overtaken by) the next one.
    if (state.inflight || state.holdTimer || !state.welcomed) return;
    for (const [id, p] of state.pending) {
      const room = state.rooms.get(p.room);
      // Wait for a join still under way ("dm" opens a direct-message room itself).
      if (p.sealing) return; // being encrypted: nothing may overtake it
      if (p.failed || !room || (!room.joined && !p.to)) continue;
      state.inflight = id;
      transmit(id, p);
      return;
    }
  }

  function transmit(id, p) {
    const room = state.rooms.get(p.room);
    const body = p.enc ? { enc: p.enc } : { text: p.text };
    // A direct-message room the server does not know us in yet is opened by "dm".
    if (p.to && (!room || !room.joined)) send({ type: "dm", to: p.to, ...body, id });
    else send({ type: "send", room: p.room, ...body, id });
  }

  function clearPending(id) {
    state.pending.delete(id);
    if (state.inflight === id) {
      state.inflight = null;
      pumpSends();
    }
  }

  function joinRoom(name) {
    const room = ensureRoom(name);
    state.active = name;
    if (!room.joined) send({ type: "join", room: name });
    saveUrl();
    render();
  }

  function openDm(user) {
    if (user === state.user) return;
    const name = dmName(state.user, user);
    const room = ensureRoom(name);
    if (!room.joined) room.dmTo = user;
    state.active = name;
    render();
    $("text").focus();
  }

  function leaveRoom() {
    const room = state.rooms.get(state.active);
    if (!room) return;
    if (room.joined) send({ type: "leave", room: room.name });
    else removeRoom(room.name);
  }

  function requestHistory(room, before, limit) {
    if (room.loading || !room.joined) return;
    if (send({ type: "history", room: room.name, before, limit: Math.min(limit, GAP_FILL_MAX) })) {
      room.loading = true;
      renderHistoryState();
    }
  }

  function minOffset(room) {
    let min = Infinity;
    for (const k of room.messages.keys()) if (k < min) min = k;
    return min;
  }

  function loadOlder() {
    const room = state.rooms.get(state.active);
    if (!room || room.loading || room.more === false || !room.joined) return;
    const oldest = room.messages.size ? minOffset(room) : room.last + 1;
    if (oldest <= 1) {
      room.more = false;
      renderHistoryState();
      return;
    }
    requestHistory(room, oldest, PAGE);
  }

  function scheduleRead() {
    clearTimeout(state.readTimer);
    state.readTimer = setTimeout(markRead, 250);
  }

  function markRead() {
    // Only what the reader can actually see: the visible room, scrolled to the end.
    const room = state.rooms.get(state.active);
    if (!room || !room.joined || document.visibilityState === "hidden" || !atBottom()) return;
    const offset = room.head;
    if (offset > room.sentRead && send({ type: "read", room: room.name, offset })) {
      room.sentRead = offset;
    }
    if (offset > room.read) {
      room.read = offset;
      renderRooms();
    }
  }

  // -- rendering --------------------------------------------------------------------

  function setConn(kind, detail) {
    document.body.dataset.conn = kind;
    const banner = $("banner");
    const dot = $("status-dot");
    dot.title = kind;
    if (kind === "reconnecting") {
      banner.textContent = navigator.onLine === false
        ? "You are offline. Waiting for the network\u2026"
        : "Connection lost. Reconnecting\u2026";
      banner.className = "banner warn";
      banner.hidden = false;
    } else if (kind === "failed") {
      banner.textContent = `Disconnected: ${detail}`;
      banner.className = "banner error";
      banner.hidden = false;
    } else if (kind === "connecting") {
      banner.textContent = "Connecting\u2026";
      banner.className = "banner";
      banner.hidden = false;
    } else {
      banner.hidden = true;
    }
  }

  let scheduled = false;
  let renderHints = [];
  function render(hint) {
    if (hint) renderHints.push(hint);
    if (scheduled) return;
    scheduled = true;
    const run = () => {
      scheduled = false;
      const hints = renderHints;
      renderHints = [];
      renderAll(hints);
    };
    // Hidden tabs get no animation frames, yet their title must show the unread count.
    if (document.hidden) setTimeout(run, 100);
    else requestAnimationFrame(run);
  }

  function renderAll(hints) {
    renderRooms();
    renderHeader();
    renderMembers();
    renderMessages(hints);
    renderTyping();
  }

  function renderRooms() {
    const rooms = $("rooms");
    const dms = $("dms");
    rooms.textContent = "";
    dms.textContent = "";
    let total = 0;
    for (const room of state.rooms.values()) {
      const li = document.createElement("li");
      const btn = document.createElement("button");
      btn.type = "button";
      btn.className = "room" + (room.name === state.active ? " active" : "");
      btn.dataset.room = room.name;
      const label = document.createElement("span");
      label.className = "room-name";
      label.textContent = roomLabel(room.name);
      btn.append(label);
      const n = room.name === state.active ? 0 : unread(room);
      total += n;
      if (n > 0) {
        const badge = document.createElement("span");
        badge.className = "badge";
        badge.textContent = n > 99 ? "99+" : String(n);
        btn.append(badge);
        btn.classList.add("has-unread");
      }
      btn.addEventListener("click", () => switchRoom(room.name));
      li.append(btn);
      (dmUsers(room.name) ? dms : rooms).append(li);
    }
    $("dm-head").hidden = dms.childElementCount === 0;
    const active = state.rooms.get(state.active);
    const title = active ? `${roomLabel(active.name)} \u00b7 chatcore` : "chatcore";
    document.title = total ? `(${total}) ${title}` : title;
  }

  function renderHeader() {
    const room = state.rooms.get(state.active);
    $("room-title").textContent = room ? roomLabel(room.name) : "No room";
    const n = room ? room.members.length : 0;
    $("room-sub").textContent = !room ? "Join a room with +"
      : room.dmTo || dmUsers(room.name) ? `Direct message with ${room.dmTo || dmPeer(room.name)}`
      : `${n} ${n === 1 ? "member" : "members"}`;
    $("leave").hidden = !room;
    const inDm = Boolean(room && (room.dmTo || dmUsers(room.name)));
    for (const id of ["call-audio", "call-video"]) {
      $(id).hidden = !inDm;
      $(id).disabled = Boolean(state.call) || !state.welcomed;
    }
    $("composer").hidden = !room;
    $("text").placeholder = room ? `Message ${roomLabel(room.name)}` : "";
    $("me-name").textContent = state.user || "";
    paintAvatar($("me-avatar"), state.user || "?");
  }

  function renderMembers() {
    const room = state.rooms.get(state.active);
    const list = $("member-list");
    list.textContent = "";
    const users = room ? room.members : [];
    $("member-count").textContent = users.length ? String(users.length) : "";
    for (const user of users) {
      const li = document.createElement("li");
      const btn = document.createElement("button");
      btn.type = "button";
      btn.className = "member";
      btn.dataset.user = user;
      btn.title = user === state.user ? "you" : `Message ${user} directly`;
      const av = document.createElement("span");
      av.className = "avatar small";
      paintAvatar(av, user);
      const name = document.createElement("span");
      name.textContent = user;
      btn.append(av, name);
      if (user === state.user) {
        const you = document.createElement("span");
        you.className = "you";
        you.textContent = "you";
        btn.append(you);
        btn.disabled = true;
      } else {
        btn.addEventListener("click", () => openDm(user));
      }
      li.append(btn);
      list.append(li);
    }
  }

  function atBottom() {
    const s = $("scroller");
    return s.scrollHeight - s.scrollTop - s.clientHeight < 40;
  }

  let shownRoom = null;
  function renderMessages(hints = []) {
    const room = state.rooms.get(state.active);
    const scroller = $("scroller");
    const list = $("messages");
    const switched = shownRoom !== state.active;
    const stick = switched ? room && room.scrollTop === null : atBottom();
    const ownSend = hints.some((h) => h.arrived && h.arrived.from === state.user);
    // Keep the message under the reader's eye in place when older ones are added above.
    let anchor = null;
    let anchorTop = 0;
    if (!switched && !stick) {
      for (const el of list.children) {
        if (el.offsetTop + el.offsetHeight > scroller.scrollTop) {
          anchor = el.dataset.key;
          anchorTop = el.offsetTop - scroller.scrollTop;
          break;
        }
      }
    }
    shownRoom = state.active;
    if (!room) {
      list.textContent = "";
      renderHistoryState();
      return;
    }
    list.dataset.room = room.name;
    // Keyed update: an element is rebuilt only when what it shows changed, and a
    // room of a thousand messages costs a walk over them, not a thousand new nodes.
    const cache = room.dom || new Map();
    const used = new Map();
    const wanted = [];
    const put = (key, sig, make) => {
      let hit = cache.get(key);
      if (!hit || hit.sig !== sig) {
        hit = { sig, el: make() };
        hit.el.dataset.key = key;
      }
      used.set(key, hit);
      wanted.push(hit.el);
    };
    const entries = [];
    for (const m of room.messages.values()) entries.push({ key: m.offset, sub: 0, m });
    for (const line of room.lines) entries.push({ key: line.after, sub: 1 + line.seq, line });
    entries.sort((a, b) => a.key - b.key || a.sub - b.sub);
    let prev = null;
    let prevDay = null;
    const seenBy = lastSeen(room);
    for (const e of entries) {
      const when = e.m ? new Date(e.m.ts) : new Date(e.line.at);
      const day = when.toDateString();
      if (day !== prevDay) {
        const label = dayLabel(when);
        put(`d${day}`, label, () => dayLine(label));
        prevDay = day;
        prev = null;
      }
      if (e.line) {
        put(`l${e.line.seq}`, "", () => {
          const li = document.createElement("li");
          li.className = "line";
          li.textContent = e.line.text;
          return li;
        });
        prev = null;
        continue;
      }
      const m = e.m;
      const grouped = Boolean(prev && prev.from === m.from && when - new Date(prev.ts) < GROUP_MS);
      const seen = seenBy.get(m.offset);
      put(String(m.offset),
        `${grouped}|${m.ts}|${seen ? seen.join(",") : ""}|${m.locked || ""}|${!!m.deleted}`,
        () => messageEl(m, grouped, seen));
      prev = m;
    }
    for (const [id, p] of state.pending) {
      if (p.room !== room.name) continue;
      const m = { from: state.user, text: p.text, ts: new Date(p.at).toISOString(), id };
      const grouped = Boolean(prev && prev.from === m.from);
      put(`p${id}`, `${grouped}|${p.failed}`, () => pendingEl(m, p, grouped));
      prev = m;
    }
    room.dom = used;
    let cur = list.firstChild;
    for (const el of wanted) {
      if (cur === el) cur = cur.nextSibling;
      else list.insertBefore(el, cur);
    }
    while (cur) {
      const next = cur.nextSibling;
      cur.remove();
      cur = next;
    }
    renderHistoryState();
    if (switched || stick || ownSend) $("jump").hidden = true;
    if (switched) {
      scroller.scrollTop = room.scrollTop === null ? scroller.scrollHeight : room.scrollTop;
    } else if (stick || ownSend) {
      scroller.scrollTop = scroller.scrollHeight;
    } else if (anchor !== null) {
      if (hints.some((h) => h.arrived)) $("jump").hidden = false;
      const el = list.querySelector(`[data-key="${CSS.escape(String(anchor))}"]`);
      if (el) scroller.scrollTop = el.offsetTop - anchorTop;
    }
    // A short room cannot be scrolled up: fetch older messages until it fills the view.
    if (room.more !== false && room.messages.size && scroller.scrollHeight <= scroller.clientHeight) {
      loadOlder();
    }
    scheduleRead();
  }

  function lastSeen(room) {
    // "Seen by" under the newest of our messages each other reader has reached.
    const byOffset = new Map();
    const mine = [...room.messages.values()].filter((m) => m.from === state.user)
      .map((m) => m.offset).sort((a, b) => a - b);
    if (!mine.length) return byOffset;
    for (const [user, offset] of room.reads) {
      let seen = null;
      for (const o of mine) if (o <= offset) seen = o;
      if (seen === null || seen !== mine[mine.length - 1]) continue;
      if (!byOffset.has(seen)) byOffset.set(seen, []);
      byOffset.get(seen).push(user);
    }
    return byOffset;
  }

  function dayLabel(when) {
    const day = when.toDateString();
    if (day === new Date().toDateString()) return "Today";
    if (day === new Date(Date.now() - 86400000).toDateString()) return "Yesterday";
    return when.toLocaleDateString([], { weekday: "long", month: "long", day: "numeric", year: "numeric" });
  }

  function dayLine(label) {
    const li = document.createElement("li");
    li.className = "day";
    const span = document.createElement("span");
    span.textContent = label;
    li.append(span);
    return li;
  }

  function pendingEl(m, p, grouped) {
    const el = messageEl(m, grouped, null);
    el.classList.add(p.failed ? "failed" : "pending");
    const status = document.createElement("div");
    status.className = "msg-status";
    if (p.failed) {
      status.textContent = `Not sent: ${p.failed} `;
      const retry = document.createElement("button");
      retry.type = "button";
      retry.className = "link";
      retry.textContent = "Retry";
      retry.addEventListener("click", () => {
        p.failed = null;
        pumpSends();
        render();
      });
      status.append(retry);
    } else {
      status.textContent = "Sending\u2026";
    }
    el.querySelector(".msg-body").append(status);
    return el;
  }

  function messageEl(m, grouped, seenBy) {
    const li = document.createElement("li");
    li.className = "msg" + (grouped ? " grouped" : "") + (m.from === state.user ? " mine" : "");
    if (m.offset !== undefined) {
      li.dataset.key = String(m.offset);
      li.dataset.offset = String(m.offset);
    }
    li.dataset.from = m.from;
    const when = new Date(m.ts);
    const time = when.toLocaleTimeString([], { hour: "numeric", minute: "2-digit" });
    if (grouped) {
      const t = document.createElement("time");
      t.className = "gutter-time";
      t.dateTime = m.ts;
      t.title = when.toLocaleString();
      t.textContent = time;
      li.append(t);
    } else {
      const av = document.createElement("span");
      av.className = "avatar";
      paintAvatar(av, m.from);
      li.append(av);
    }
    const body = document.createElement("div");
    body.className = "msg-body";
    if (!grouped) {
      const head = document.createElement("div");
      head.className = "msg-head";
      const who = document.createElement("span");
      who.className = "from";
      who.textContent = m.from;
      const t = document.createElement("time");
      t.dateTime = m.ts;
      t.title = when.toLocaleString();
      t.textContent = time;
      head.append(who, t);
      body.append(head);
    }
    const text = document.createElement("div");
    text.className = "text";
    text.textContent = m.text;
    if (m.deleted) showDeleted(li, text);
    else e2eDecorate(li, text, m);
    body.append(text);
    if (seenBy && seenBy.length) {
      const seen = document.createElement("div");
      seen.className = "seen";
      seen.textContent = `Seen by ${seenBy.sort(byName).join(", ")}`;
      body.append(seen);
    }
    li.append(body);
    return li;
  }

  function renderHistoryState() {
    const room = state.rooms.get(state.active);
    const el = $("history-state");
    if (!room) {
      el.textContent = "";
      return;
    }
    if (room.loading) el.textContent = "Loading older messages\u2026";
    else if (room.dmTo) el.textContent = `This is the start of your conversation with ${room.dmTo}.`;
    else if (room.more === false || (room.messages.size && minOffset(room) === 1)) {
      el.textContent = `This is the beginning of ${roomLabel(room.name)}.`;
    } else el.textContent = "";
  }

  function renderTyping() {
    const el = $("typing");
    const room = state.rooms.get(state.active);
    const now = Date.now();
    const users = [];
    if (room) {
      for (const [user, until] of room.typing) {
        if (until <= now) room.typing.delete(user);
        else users.push(user);
      }
    }
    users.sort(byName);
    let text = "";
    if (users.length === 1) text = `${users[0]} is typing`;
    else if (users.length === 2) text = `${users[0]} and ${users[1]} are typing`;
    else if (users.length > 2) text = `${users.length} people are typing`;
    if (text) {
      el.innerHTML = '<span class="dots"><i></i><i></i><i></i></span>';
      el.append(document.createTextNode(text + "\u2026"));
    } else {
      el.textContent = "";
    }
  }

  function addLine(room, text) {
    state.lineSeq += 1;
    room.lines.push({ after: room.head, seq: state.lineSeq, text, at: Date.now() });
    if (room.lines.length > 200) room.lines.shift();
  }

  function addLineEverywhere(text) {
    for (const room of state.rooms.values()) if (room.joined) addLine(room, text);
  }

  function byName(a, b) {
    return a.localeCompare(b, undefined, { sensitivity: "base" });
  }

  function paintAvatar(el, name) {
    let h = 0;
    for (const ch of name) h = (h * 31 + ch.codePointAt(0)) >>> 0;
    el.style.setProperty("--hue", String(h % 360));
    el.textContent = name.slice(0, 1).toUpperCase();
  }

  let toastTimer = null;
  function toast(text) {
    const el = $("toast");
    el.textContent = text;
    el.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { el.hidden = true; }, 5000);
  }

  function switchRoom(name) {
    const current = state.rooms.get(state.active);
    if (current) {
      markRead(); // what was on screen counts as read, even if the reader leaves at once
      current.scrollTop = atBottom() ? null : $("scroller").scrollTop;
    }
    state.active = name;
    render();
    $("text").focus();
  }

  function saveUrl() {
    const q = new URLSearchParams();
    if (state.user) q.append("user", state.user);
    for (const room of state.rooms.values()) {
      if (!room.dmTo && !dmUsers(room.name)) q.append("room", room.name);
    }
    history.replaceState(null, "", `${location.pathname}?${q}`);
  }

  // -- calls ------------------------------------------------------------------------
  //
  // One call at a time, in a direct-message conversation. The server only relays
  // the signalling (docs/protocol.md section 8); media go browser to browser over
  // an RTCPeerConnection built with the ICE servers of GET /config.json.

  const ENDED_TEXT = {
    hangup: "Call ended",
    declined: "Call declined",
    busy: "is busy",
    timeout: "No answer",
    failed: "The call could not connect",
    gone: "Call ended: the other side went away",
    offline: "is not online",
    unavailable: "is online, but not where calls can be taken",
    answered_elsewhere: "Answered in another tab",
  };

  function callId() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes); // randomUUID needs a secure context; this does not
    return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
  }

  function newCall(id, peer, video, role) {
    return {
      id, peer, video, role,
      phase: role === "caller" ? "calling" : "incoming", // ringing, connecting, active
      pc: null,
      local: null, // our MediaStream
      offer: null, // the caller's offer, until we answer it
      accepted: false,
      candidates: [], // remote candidates that came before the remote description
      connectedSent: false,
      muted: false,
      cameraOff: false,
    };
  }

  async function startCall(video) {
    const room = state.rooms.get(state.active);
    const peer = room && (room.dmTo || dmPeer(room.name));
    if (!peer || state.call || !state.welcomed) return;
    const call = newCall(callId(), peer, video, "caller");
    state.call = call;
    renderCall();
    try {
      call.local = await navigator.mediaDevices.getUserMedia({ audio: true, video });
    } catch (err) {
      endCall(call, `No ${video ? "camera or " : ""}microphone: ${err.message || err.name}`);
      return;
    }
    if (state.call !== call) return stopMedia(call);
    send({ type: "call", call: call.id, to: peer, video });
    const pc = peerConnection(call);
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    if (state.call === call) send({ type: "offer", call: call.id, sdp: offer.sdp });
  }

  function peerConnection(call) {
    const pc = new RTCPeerConnection({ iceServers: state.iceServers });
    call.pc = pc;
    for (const track of call.local.getTracks()) pc.addTrack(track, call.local);
    pc.onicecandidate = (e) => {
      if (!e.candidate || state.call !== call) return;
      send({
        type: "candidate",
        call: call.id,
        candidate: e.candidate.candidate,
        mid: e.candidate.sdpMid,
        index: e.candidate.sdpMLineIndex,
      });
    };
    pc.ontrack = (e) => {
      const remote = $("remote-video");
      if (remote.srcObject !== e.streams[0]) remote.srcObject = e.streams[0] || new MediaStream([e.track]);
    };
    pc.onconnectionstatechange = () => {
      if (state.call !== call) return;
      if (pc.connectionState === "connected") {
        call.phase = "active";
        if (!call.connectedSent) {
          call.connectedSent = true;
          send({ type: "connected", call: call.id });
        }
      } else if (pc.connectionState === "failed") {
        hangUp();
        toast("The call could not connect");
        return;
      }
      renderCall();
    };
    $("local-video").srcObject = call.local;
    return pc;
  }

  async function acceptCall() {
    const call = state.call;
    if (!call || call.phase !== "incoming" || call.accepted) return;
    call.accepted = true;
    call.phase = "connecting";
    openDm(call.peer); // the conversation the call belongs to
    renderCall();
    try {
      call.local = await navigator.mediaDevices.getUserMedia({ audio: true, video: call.video });
    } catch (err) {
      send({ type: "decline", call: call.id });
      endCall(call, `No ${call.video ? "camera or " : ""}microphone: ${err.message || err.name}`);
      return;
    }
    if (state.call !== call) return stopMedia(call);
    peerConnection(call);
    if (call.offer) answerOffer(call, call.offer);
  }

  async function answerOffer(call, sdp) {
    const pc = call.pc;
    call.offer = null;
    await pc.setRemoteDescription({ type: "offer", sdp });
    await flushCandidates(call);
    const answer = await pc.createAnswer();
    await pc.setLocalDescription(answer);
    if (state.call === call) send({ type: "answer", call: call.id, sdp: answer.sdp });
  }

  async function flushCandidates(call) {
    const waiting = call.candidates;
    call.candidates = [];
    for (const c of waiting) await addCandidate(call, c);
  }

  async function addCandidate(call, c) {
    if (!c.candidate) return; // "no more candidates"
    try {
      await call.pc.addIceCandidate({ candidate: c.candidate, sdpMid: c.mid, sdpMLineIndex: c.index });
    } catch { /* a candidate this browser cannot use: the others may do */ }
  }

  function declineCall() {
    const call = state.call;
    if (!call || call.phase !== "incoming") return;
    send({ type: "decline", call: call.id });
    endCall(call, null);
  }

  function hangUp() {
    const call = state.call;
    if (!call) return;
    send({ type: call.phase === "incoming" ? "decline" : "hangup", call: call.id });
    endCall(call, null);
  }

  function stopMedia(call) {
    if (call.local) for (const t of call.local.getTracks()) t.stop();
    call.local = null;
  }

  function endCall(call, why) {
    if (state.call !== call) return;
    state.call = null;
    state.endedCalls.add(call.id);
    if (call.pc) call.pc.close();
    stopMedia(call);
    $("remote-video").srcObject = null;
    $("local-video").srcObject = null;
    if (why) toast(why);
    renderCall();
    renderHeader();
  }

  function onCallSignal(ev) {
    const call = state.call;
    if (ev.type === "call") {
      if (call) {
        send({ type: "busy", call: ev.call }); // one call at a time
        return;
      }
      state.call = newCall(ev.call, ev.from, ev.video, "callee");
      renderCall();
      return;
    }
    if (!call || call.id !== ev.call) return; // an old call's stragglers
    switch (ev.type) {
      case "ringing":
        call.phase = "ringing";
        break;
      case "offer":
        if (call.pc && !call.offer) answerOffer(call, ev.sdp); // renegotiation, or our answer
        else call.offer = ev.sdp;
        return;
      case "answer":
        if (call.pc) {
          call.phase = "connecting";
          call.pc.setRemoteDescription({ type: "answer", sdp: ev.sdp }).then(() => flushCandidates(call));
        }
        break;
      case "candidate":
        if (call.pc && call.pc.remoteDescription) addCandidate(call, ev);
        else call.candidates.push(ev);
        return;
      case "ended": {
        const text = ENDED_TEXT[ev.reason] || "Call ended";
        endCall(call, text.startsWith("is ") ? `${call.peer} ${text}` : text);
        return;
      }
      default:
        return;
    }
    renderCall();
  }

  function renderCall() {
    const call = state.call;
    const incoming = call && call.phase === "incoming";
    $("incoming").hidden = !incoming;
    if (incoming) {
      paintAvatar($("incoming-avatar"), call.peer);
      $("incoming-text").textContent = `${call.peer} is calling${call.video ? " (video)" : ""}\u2026`;
    }
    const panel = $("call-panel");
    panel.hidden = !call || incoming;
    document.body.dataset.call = call ? call.phase : "none";
    for (const id of ["call-audio", "call-video"]) $(id).disabled = Boolean(call) || !state.welcomed;
    if (!call || incoming) return;
    panel.dataset.video = String(call.video);
    $("call-status").textContent = {
      calling: `Calling ${call.peer}\u2026`,
      ringing: `Ringing ${call.peer}\u2026`,
      connecting: `Connecting to ${call.peer}\u2026`,
      active: `In a call with ${call.peer}`,
    }[call.phase];
    $("mute").textContent = call.muted ? "Unmute" : "Mute";
    $("mute").setAttribute("aria-pressed", String(call.muted));
    $("camera").hidden = !call.video;
    $("camera").textContent = call.cameraOff ? "Camera on" : "Camera off";
    $("camera").setAttribute("aria-pressed", String(call.cameraOff));
  }

  function toggleMute() {
    const call = state.call;
    if (!call || !call.local) return;
    call.muted = !call.muted;
    for (const t of call.local.getAudioTracks()) t.enabled = !call.muted;
    renderCall();
  }

  function toggleCamera() {
    const call = state.call;
    if (!call || !call.local) return;
    call.cameraOff = !call.cameraOff;
    for (const t of call.local.getVideoTracks()) t.enabled = !call.cameraOff;
    renderCall();
  }

  async function loadConfig() {
    try {
      const reply = await fetch("/config.json", { cache: "no-store" });
      if (reply.ok) state.iceServers = (await reply.json()).iceServers || [];
    } catch { /* an older server: no ICE servers, which is right on a LAN */ }
  }

  // -- end-to-end encryption (docs/protocol.md section 11) ----------------------------
  //
  // This browser profile is one device: an X25519 identity key and one-time prekeys,
  // kept in IndexedDB with their private halves non-extractable. A direct message to
  // a user who has published keys is sealed for each of their devices (and each other
  // device of ours, and this one, to read it back from history): a fresh ephemeral key
  // E, secret = DH(our identity, theirs) | DH(E, theirs) | DH(E, their prekey), HKDF-SHA256
  // to an AES-GCM key bound to the room and both users and devices. The same scheme as
  // the Python client (adapters/chatcore_server/e2e.py): the two read each other.

  const E2E_DB = "chatcore-e2e";
  const E2E_STOCK = 50; // prekeys published at once, and topped up to
  const E2E_WAIT_MS = 10000; // a claim_keys answer that takes longer counts as no keys
  const e2e = {
    ready: null, // Promise of this user's device record, once started
    me: null, // {user, device, identity: CryptoKeyPair, prekeys: {id: CryptoKeyPair}, nextId}
    published: false,
    peers: new Map(), // user -> Promise of [{user, device, identity, prekey}], claimed once
    claims: new Map(), // user -> resolve of a claim_keys awaiting its answer
  };
  const E2E_INFO = "chatcore e2e v1";
  const E2E_UNDECRYPTABLE = "Cannot decrypt on this device";

  function e2eSupported() {
    return !!(window.crypto && crypto.subtle && window.indexedDB);
  }

  function b64(bytes) {
    let s = "";
    for (const b of new Uint8Array(bytes)) s += String.fromCharCode(b);
    return btoa(s);
  }

  function unb64(text) {
    if (typeof text !== "string") throw new Error("malformed envelope");
    return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  }

  function e2eStore(mode, fn) {
    return new Promise((resolve, reject) => {
      const open = indexedDB.open(E2E_DB, 1);
      open.onupgradeneeded = () => open.result.createObjectStore("devices");
      open.onerror = () => reject(open.error);
      open.onsuccess = () => {
        const db = open.result;
        const tx = db.transaction("devices", mode);
        const req = fn(tx.objectStore("devices"));
        tx.oncomplete = () => { db.close(); resolve(req ? req.result : undefined); };
        tx.onerror = () => { db.close(); reject(tx.error); };
      };
    });
  }

  function x25519Pair() {
    return crypto.subtle.generateKey({ name: "X25519" }, false, ["deriveBits"]);
  }

  async function rawPublic(pair) {
    return b64(await crypto.subtle.exportKey("raw", pair.publicKey));
  }

  function importPublic(text) {
    const raw = unb64(text);
    if (raw.length !== 32) throw new Error("malformed key");
    return crypto.subtle.importKey("raw", raw, { name: "X25519" }, true, []);
  }

  async function dh(privateKey, publicKey) {
    return new Uint8Array(
      await crypto.subtle.deriveBits({ name: "X25519", public: publicKey }, privateKey, 256));
  }

  async function aesKey(secret, room, sender, senderDevice, to, toDevice) {
    const enc = new TextEncoder();
    const parts = [room, sender, senderDevice, to, toDevice].map((p) => enc.encode(p));
    const info = [...enc.encode(E2E_INFO)];
    parts.forEach((p, i) => { if (i) info.push(0); info.push(...p); });
    const base = await crypto.subtle.importKey("raw", secret, "HKDF", false, ["deriveKey"]);
    return crypto.subtle.deriveKey(
      { name: "HKDF", hash: "SHA-256", salt: new Uint8Array(0), info: new Uint8Array(info) },
      base, { name: "AES-GCM", length: 256 }, false, ["encrypt", "decrypt"]);
  }

  function concat(...arrays) {
    const out = new Uint8Array(arrays.reduce((n, a) => n + a.length, 0));
    let at = 0;
    for (const a of arrays) { out.set(a, at); at += a.length; }
    return out;
  }

  // Load (or make) this user's device, then publish its keys once per page.
  function e2eStart() {
    if (!e2eSupported() || e2e.ready) return;
    const user = state.user;
    e2e.ready = (async () => {
      let me = await e2eStore("readonly", (s) => s.get(user));
      if (!me) {
        const rand = b64(crypto.getRandomValues(new Uint8Array(6))).replace(/[^A-Za-z0-9]/g, "x");
        me = { user, device: `web-${rand}`, identity: await x25519Pair(), prekeys: {}, nextId: 1 };
      }
      e2e.me = me;
      await e2ePublish(me.nextId === 1 ? E2E_STOCK : 0);
      return me;
    })().catch((err) => {
      e2e.me = null; // no WebCrypto X25519 here: direct messages stay plain
      console.warn("end-to-end encryption unavailable:", err);
      return null;
    });
  }

  async function e2ePublish(count) {
    const me = e2e.me;
    const prekeys = [];
    for (let i = 0; i < count; i += 1) {
      const pair = await x25519Pair();
      me.prekeys[me.nextId] = pair;
      prekeys.push({ id: me.nextId, key: await rawPublic(pair) });
      me.nextId += 1;
    }
    await e2eStore("readwrite", (s) => s.put(me, me.user));
    send({ type: "publish_keys", device: me.device, identity: await rawPublic(me.identity), prekeys });
  }

  function onKeysEvent(ev) {
    if (ev.type === "keys") {
      const resolve = e2e.claims.get(ev.user);
      e2e.claims.delete(ev.user);
      if (resolve) resolve(ev.devices.map((d) => ({ user: ev.user, ...d })));
    } else if (ev.type === "keys_low" && e2e.me && ev.device === e2e.me.device) {
      e2ePublish(E2E_STOCK);
    } else if (ev.type === "keys_published") {
      e2e.published = true;
    }
  }

  function e2eClaimRefused(ev) {
    const resolve = ev.ref ? e2e.claims.get(ev.ref) : null;
    if (!resolve) return false;
    e2e.claims.delete(ev.ref);
    resolve([]);
    return true;
  }

  function e2eDevicesOf(user) {
    if (!e2e.peers.has(user)) {
      e2e.peers.set(user, new Promise((resolve) => {
        e2e.claims.set(user, resolve);
        setTimeout(() => { if (e2e.claims.get(user) === resolve) resolve([]); }, E2E_WAIT_MS);
        if (!send({ type: "claim_keys", user })) resolve([]);
      }).then((devices) => {
        if (!devices.length) e2e.peers.delete(user); // ask again next time
        return devices;
      }));
    }
    return e2e.peers.get(user);
  }

  // The envelope of `text` for user `to`, or null when `to` has no keys (sent plain).
  async function e2eSeal(room, to, text) {
    const me = e2e.ready && await e2e.ready;
    if (!me) return null;
    const theirs = await e2eDevicesOf(to);
    if (!theirs.length) return null;
    const ours = (await e2eDevicesOf(me.user)).filter((d) => d.device !== me.device);
    const self = { user: me.user, device: me.device, identity: await rawPublic(me.identity) };
    const plaintext = new TextEncoder().encode(text);
    const payloads = {};
    for (const peer of [...theirs, ...ours, self]) {
      const eph = await x25519Pair();
      const identity = await importPublic(peer.identity);
      let secret = concat(await dh(me.identity.privateKey, identity),
        await dh(eph.privateKey, identity));
      const payload = { ephemeral: await rawPublic(eph) };
      if (peer.prekey) {
        secret = concat(secret, await dh(eph.privateKey, await importPublic(peer.prekey.key)));
        payload.prekey_id = peer.prekey.id;
      }
      const key = await aesKey(secret, room, me.user, me.device, peer.user, peer.device);
      const iv = crypto.getRandomValues(new Uint8Array(12));
      payload.iv = b64(iv);
      payload.ct = b64(await crypto.subtle.encrypt({ name: "AES-GCM", iv }, key, plaintext));
      payloads[peer.device] = payload;
    }
    return { v: 1, from_device: me.device, identity: self.identity, payloads };
  }

  async function e2eOpen(m) {
    const me = e2e.ready && await e2e.ready;
    const enc = m.enc;
    const payload = me && enc && enc.payloads ? enc.payloads[me.device] : null;
    if (!payload) throw new Error(E2E_UNDECRYPTABLE);
    const identity = await importPublic(enc.identity);
    const eph = await importPublic(payload.ephemeral);
    let secret = concat(await dh(me.identity.privateKey, identity),
      await dh(me.identity.privateKey, eph));
    if (payload.prekey_id !== undefined) {
      const prekey = me.prekeys[payload.prekey_id];
      if (!prekey) throw new Error(E2E_UNDECRYPTABLE);
      secret = concat(secret, await dh(prekey.privateKey, eph));
    }
    const key = await aesKey(secret, m.room, m.from, enc.from_device, me.user, me.device);
    let plain;
    try {
      plain = await crypto.subtle.decrypt({ name: "AES-GCM", iv: unb64(payload.iv) }, key,
        unb64(payload.ct));
    } catch {
      throw new Error(`${E2E_UNDECRYPTABLE} (the message was altered)`);
    }
    return new TextDecoder("utf-8", { fatal: true }).decode(plain);
  }

  // An encrypted message as it arrives: shown locked until decrypted, then its text;
  // never the envelope. What cannot be decrypted says so and shows nothing else.
  function e2eIncoming(m) {
    if (!m.enc) return m;
    m.text = "";
    m.locked = "opening";
    e2eOpen(m).then((text) => {
      m.text = text;
      m.locked = "open";
    }, (err) => {
      m.locked = "undecryptable";
      m.text = String(err && err.message && err.message.startsWith(E2E_UNDECRYPTABLE)
        ? err.message : E2E_UNDECRYPTABLE);
    }).then(() => render());
    return m;
  }

  // Seal a queued direct message before it is sent; the queue waits for it (order).
  function e2eQueue(p) {
    if (!p.to || !e2e.ready) return;
    p.sealing = true;
    e2eSeal(p.room, p.to, p.text).then((enc) => { p.enc = enc; }, () => { p.enc = null; })
      .then(() => { p.sealing = false; pumpSends(); render(); });
  }

  function e2eDecorate(li, textEl, m) {
    if (!m.locked && !m.enc) return;
    li.classList.add("encrypted");
    const lock = document.createElement("span");
    lock.className = "lock";
    lock.title = "End-to-end encrypted";
    lock.textContent = "\u{1F512}";
    if (m.locked === "undecryptable") {
      li.classList.add("undecryptable");
      textEl.textContent = m.text || E2E_UNDECRYPTABLE;
    } else if (m.locked === "opening") {
      textEl.textContent = "Decrypting\u2026";
    }
    textEl.prepend(lock, " ");
  }

  // -- start ------------------------------------------------------------------------

  function start(user, rooms) {
    state.user = user;
    try { localStorage.setItem("chatcore.user", user); } catch { /* private mode */ }
    for (const r of rooms) ensureRoom(r);
    state.active = rooms[0];
    $("login").hidden = true;
    $("app").hidden = false;
    render();
    connect();
    $("text").focus();
  }

  function init() {
    const params = new URLSearchParams(location.search);
    // A token may come in the link; keep it for this tab, out of the address bar.
    try {
      if (params.get("token")) sessionStorage.setItem("chatcore.token", params.get("token"));
      state.auth = sessionStorage.getItem("chatcore.token");
    } catch { state.auth = params.get("token"); }
    const user = params.get("user");
    const rooms = params.getAll("room").filter((r) => NAME.test(r) || dmUsers(r));
    if (user && NAME.test(user) && rooms.length) {
      start(user, [...new Set(rooms)]);
    } else {
      $("login").hidden = false;
      let remembered = null;
      try { remembered = localStorage.getItem("chatcore.user"); } catch { /* private mode */ }
      $("login-user").value = user || remembered || "";
      if (rooms.length) $("login-room").value = rooms[0];
      ($("login-user").value ? $("login-room") : $("login-user")).focus();
    }

    $("login-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const u = $("login-user").value.trim();
      const r = $("login-room").value.trim();
      if (NAME.test(u) && NAME.test(r)) start(u, [r]);
    });

    const text = $("text");
    $("composer").addEventListener("submit", (e) => {
      e.preventDefault();
      sendText(text.value);
      text.value = "";
      autosize();
      state.typingSentAt = 0;
    });
    text.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        $("composer").requestSubmit();
      }
    });
    text.addEventListener("input", () => {
      autosize();
      const room = state.rooms.get(state.active);
      const now = Date.now();
      if (room && room.joined && text.value && now - state.typingSentAt > TYPING_SEND_MS) {
        if (send({ type: "typing", room: room.name })) state.typingSentAt = now;
      }
    });
    function autosize() {
      text.style.height = "auto";
      text.style.height = Math.min(text.scrollHeight, 200) + "px";
    }

    $("scroller").addEventListener("scroll", () => {
      if ($("scroller").scrollTop < 120) loadOlder();
      if (atBottom()) {
        $("jump").hidden = true;
        scheduleRead();
      }
    }, { passive: true });
    $("jump").addEventListener("click", () => {
      $("scroller").scrollTop = $("scroller").scrollHeight;
      $("jump").hidden = true;
    });
    document.addEventListener("visibilitychange", scheduleRead);
    window.addEventListener("focus", scheduleRead);

    $("add-room").addEventListener("click", () => {
      const form = $("join-form");
      form.hidden = !form.hidden;
      if (!form.hidden) $("join-room").focus();
    });
    $("join-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const name = $("join-room").value.trim();
      if (!NAME.test(name)) {
        toast("Room names are 1-64 letters, digits, _ - or .");
        return;
      }
      $("join-room").value = "";
      $("join-form").hidden = true;
      joinRoom(name);
    });
    $("join-room").addEventListener("keydown", (e) => {
      if (e.key === "Escape") $("join-form").hidden = true;
    });
    $("leave").addEventListener("click", leaveRoom);
    $("call-audio").addEventListener("click", () => startCall(false));
    $("call-video").addEventListener("click", () => startCall(true));
    $("accept").addEventListener("click", acceptCall);
    $("decline").addEventListener("click", declineCall);
    $("hangup").addEventListener("click", hangUp);
    $("mute").addEventListener("click", toggleMute);
    $("camera").addEventListener("click", toggleCamera);
    window.addEventListener("pagehide", hangUp);
    loadConfig();

    setInterval(renderTyping, 1000);
  }

  // For tests and the curious: a look at the state, and a way to lose the connection.
  window.__chatcore = {
    state,
    dropConnection,
    get connected() { return state.welcomed; },
    get call() { return state.call; },
    get e2e() { return e2e; },
  };

  init();
})();
