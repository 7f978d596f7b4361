// FlutterFlow's generated push-notification function (firebase/functions/index.js:
// `sendPushNotifications`, firebase-admin 12), run against the same emulators as ffpush so
// the benchmark can compare the two on one machine. The sending logic is the generated
// function's, as FlutterFlow writes it; only the transport is redirected:
// - Firestore: the Admin SDK's own emulator support (FIRESTORE_EMULATOR_HOST);
// - FCM: firebase-admin opens one HTTP/2 session to https://fcm.googleapis.com per
//   `sendEachForMulticast` call; `http2.connect` is pointed at FFPUSH_BENCH_FCM_URL, trusting
//   the bench's CA (and the request's `:scheme` corrected, below);
// - OAuth2: a JWT-bearer grant to the service-account key's `token_uri` (the emulator).
//
// Usage: node function.js <document path> (e.g. ff_push_notifications/abc). Prints one JSON
// line: {"ms": …, "num_sent": …}, the time from reading the document to writing its outcome
// (a Cloud Functions trigger's own delivery and cold start are not counted).
"use strict";

const fs = require("fs");
const http2 = require("http2");
const crypto = require("crypto");
const admin = require("firebase-admin");

const env = (name) => {
  const v = process.env[name];
  if (!v) {
    console.error(`${name} is not set`);
    process.exit(64);
  }
  return v;
};
const fcmUrl = env("FFPUSH_BENCH_FCM_URL");
const key = JSON.parse(fs.readFileSync(env("FFPUSH_BENCH_KEY"), "utf8"));
const ca = process.env.FFPUSH_BENCH_CA ? fs.readFileSync(process.env.FFPUSH_BENCH_CA) : undefined;
env("FIRESTORE_EMULATOR_HOST");

const connect = http2.connect;
http2.connect = (authority, options, listener) => {
  if (!String(authority).startsWith("https://fcm.googleapis.com")) {
    return connect(authority, options, listener);
  }
  const session = connect(fcmUrl, { ...options, ca }, listener);
  // firebase-admin sends `:scheme: https:` (a URL's protocol, colon included). Google's front
  // end lets it pass; the emulator's HTTP/2 server (the h2 crate) resets such a stream as
  // malformed, so the scheme is sent as RFC 9113 spells it.
  const request = session.request.bind(session);
  session.request = (headers, opts) =>
    request({ ...headers, ":scheme": String(headers[":scheme"] || "https").replace(/:$/, "") }, opts);
  return session;
};

const b64 = (x) => Buffer.from(x).toString("base64url");
const credential = {
  async getAccessToken() {
    const now = Math.floor(Date.now() / 1000);
    const header = b64(JSON.stringify({ alg: "RS256", typ: "JWT", kid: key.private_key_id }));
    const claims = b64(
      JSON.stringify({
        iss: key.client_email,
        scope: "https://www.googleapis.com/auth/firebase.messaging",
        aud: key.token_uri,
        iat: now,
        exp: now + 3600,
      }),
    );
    const signature = crypto.sign("RSA-SHA256", Buffer.from(`${header}.${claims}`), key.private_key);
    const response = await fetch(key.token_uri, {
      method: "POST",
      headers: { "content-type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams({
        grant_type: "urn:ietf:params:oauth:grant-type:jwt-bearer",
        assertion: `${header}.${claims}.${b64(signature)}`,
      }),
    });
    if (!response.ok) {
      throw new Error(`token endpoint: ${response.status} ${await response.text()}`);
    }
    return response.json();
  },
};

const projectId = env("FFPUSH_BENCH_PROJECT");
admin.initializeApp({ projectId, credential });
// The Firestore client insists on a certificate credential even for the emulator (which
// ignores it); FCM goes through the default app's credential above.
const firestore = admin.initializeApp({ projectId, credential: admin.credential.cert(key) }, "firestore").firestore();
const kFcmTokensCollection = "fcm_tokens";

// As generated (current version), minus the scheduled and batch branches the bench never uses.
async function sendPushNotifications(snapshot) {
  const notificationData = snapshot.data();
  const title = notificationData.notification_title || "";
  const body = notificationData.notification_text || "";
  const imageUrl = notificationData.notification_image_url || "";
  const sound = notificationData.notification_sound || "";
  const parameterData = notificationData.parameter_data || "";
  const targetAudience = notificationData.target_audience || "";
  const initialPageName = notificationData.initial_page_name || "";
  const userRefsStr = notificationData.user_refs || "";
  const status = notificationData.status || "";

  if (status !== "" && status !== "started") {
    console.error(`Already processed ${snapshot.ref.path}. Skipping...`);
    return;
  }
  if (title === "" || body === "") {
    await snapshot.ref.update({ status: "failed" });
    return;
  }

  const tokens = new Set();
  if (userRefsStr) {
    for (const userRef of userRefsStr.trim().split(",")) {
      const fcmTokens = await firestore.doc(userRef).collection(kFcmTokensCollection).get();
      fcmTokens.docs.forEach((token) => {
        if (typeof token.data().fcm_token !== undefined) {
          tokens.add(token.data().fcm_token);
        }
      });
    }
  } else {
    const userTokens = await firestore.collectionGroup(kFcmTokensCollection).get();
    userTokens.docs.forEach((token) => {
      const data = token.data();
      const audienceMatches = targetAudience === "All" || data.device_type === targetAudience;
      if (audienceMatches && typeof data.fcm_token !== undefined) {
        tokens.add(data.fcm_token);
      }
    });
  }

  const tokensArr = Array.from(tokens);
  const messageBatches = [];
  for (let i = 0; i < tokensArr.length; i += 500) {
    const tokensBatch = tokensArr.slice(i, Math.min(i + 500, tokensArr.length));
    const messages = {
      notification: {
        title: title,
        body: body,
        ...(imageUrl && { imageUrl: imageUrl }),
      },
      data: {
        initialPageName: initialPageName,
        parameterData: parameterData,
      },
      android: {
        notification: {
          ...(sound && { sound: sound }),
        },
      },
      apns: {
        payload: {
          aps: {
            ...(sound && { sound: sound }),
          },
        },
      },
      tokens: tokensBatch,
    };
    messageBatches.push(messages);
  }

  let numSent = 0;
  await Promise.all(
    messageBatches.map(async (messages) => {
      const response = await admin.messaging().sendEachForMulticast(messages);
      numSent += response.successCount;
      // Not in the generated function: says why, when the bench finds sends missing.
      const failed = response.responses.find((r) => !r.success);
      if (failed) {
        console.error(`${response.failureCount} failed, e.g.: ${failed.error}`);
      }
    }),
  );

  await snapshot.ref.update({ status: "succeeded", num_sent: numSent });
  return numSent;
}

async function main() {
  const path = process.argv[2];
  if (!path) {
    console.error("usage: node function.js <document path>");
    process.exit(64);
  }
  // Connect and authenticate first, as a warm function instance is.
  await credential.getAccessToken();
  await firestore.doc(path).get();
  const started = process.hrtime.bigint();
  const snapshot = await firestore.doc(path).get();
  const numSent = await sendPushNotifications(snapshot);
  const ms = Number(process.hrtime.bigint() - started) / 1e6;
  console.log(JSON.stringify({ ms, num_sent: numSent }));
  await Promise.all(admin.apps.map((app) => app.delete()));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
