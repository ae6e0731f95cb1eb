from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies: list[tuple[str, str]] = []

    operations = [
        migrations.CreateModel(
            name="Ticket",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("event_id", models.CharField(max_length=255, unique=True)),
                ("source", models.CharField(max_length=20)),
                ("subject", models.TextField()),
                ("requester", models.CharField(blank=True, max_length=255)),
                ("text", models.TextField(blank=True)),
                ("message_id", models.CharField(blank=True, max_length=255)),
                ("opened_at", models.DateTimeField(auto_now_add=True)),
                ("closed", models.BooleanField(default=False)),
            ],
        ),
        migrations.CreateModel(
            name="Activity",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("source", models.CharField(max_length=20)),
                ("summary", models.TextField()),
                ("time", models.FloatField()),
            ],
            options={"ordering": ["pk"]},
        ),
    ]
